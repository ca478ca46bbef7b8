"""The project's one tokenizer, used for the vocabulary, training targets and evaluation references.

Why this tokenizer: it is close to the PTB tokenization that coco-caption (pycocoevalcap) applies
before scoring, so our BLEU/CIDEr numbers are comparable with papers, and it needs no downloaded
NLTK data (TreebankWordTokenizer is rule based).

Rules: lowercase; NLTK ``TreebankWordTokenizer`` (splits clitics such as ``'s``, keeps hyphenated
words whole); tokens without any letter or digit (punctuation) are dropped; trailing periods left
inside a token (Treebank only splits the final one) are stripped.
"""

from __future__ import annotations

import functools


@functools.cache
def _treebank():
    """NLTK's tokenizer, made on first use. Why not on import: importing any part of nltk runs its package
    ``__init__``, which imports scipy.stats (~1.2 s of the ~6 s a `captioner caption` run takes to start on the
    2-core CPU), and captioning photos never tokenises; training, evaluation and scoring do."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens without punctuation."""
    tokens = []
    for token in _treebank().tokenize(text.lower()):
        token = token.rstrip(".")
        if any(ch.isalnum() for ch in token):
            tokens.append(token)
    return tokens


def detokenize(tokens: list[str]) -> str:
    """Join tokens into display text (clitics such as ``'s`` attach to the previous word)."""
    text = ""
    for token in tokens:
        if text and not token.startswith("'") and token != "n't":
            text += " "
        text += token
    return text
