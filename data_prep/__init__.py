"""Dataset side of captioner: caption files -> manifest + vocabulary -> cached encoder features.

Every reader (COCO, Karpathy, Flickr8k) produces the same on-disk dataset so that training,
evaluation and the feature cache never need to know where the captions came from.
"""
