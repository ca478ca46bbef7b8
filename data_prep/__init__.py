"""Dataset side of captioner: caption files -> ``Record`` lists -> a prepared data directory.

Every reader (COCO, Karpathy, Flickr8k, CSV, folder) produces the same on-disk dataset (the manifest and
vocabulary formats live in ``captioner.manifest`` / ``captioner.vocab``) so that training, evaluation and
the feature cache never need to know where the captions came from. Also here: offline derivations of
files the library ships (``bn_stats``, ``imagenet_words``). This package imports ``captioner``; the
library never imports it back (only the CLI's ``prepare`` command drives it).
"""
