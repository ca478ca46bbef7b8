"""Word <-> id mapping with the four special tokens, built from training captions only."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from captioner.errors import VocabError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
# Words that state a person's gender, which gender-neutral decoding never uses (``DecodeConfig.neutral``). Why a
# list: a caption's "woman" or "man" is the model's guess from how a person looks, wrong for about a fifth of the val
# photos whose references agree the subject is female (MODEL_CARD "Limits"); "person", "child", "people" say what is
# seen.
GENDERED_WORDS = frozenset((
    "man men mans woman women womans boy boys girl girls lady ladies guy guys gentleman gentlemen "
    "he she his her hers him himself herself male males female females "
    "mother mothers father fathers mom moms dad dads son sons daughter daughters brother brothers sister sisters "
    "husband wife boyfriend girlfriend grandmother grandfather grandma grandpa bride bridesmaid bridesmaids "
    "groom groomsmen cowboy cowboys cowgirl cowgirls policeman policemen fireman firemen fisherman fishermen "
    "cameraman baseman batsman businessman businessmen waitress actress king queen prince princess").split())


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the four special tokens, passed as one object to decoding and training (not four loose ints)."""

    pad: int = 0
    start: int = 1
    end: int = 2
    unk: int = 3


@dataclass
class Vocab:
    """Ordered word list; ids are positions. Ids 0..3 are always <pad> <start> <end> <unk>."""

    words: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    # how many training captions end on each word; empty in vocabularies made before 2026-11-29 (``non_final``)
    ends: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIALS:
            raise VocabError(f"vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        if len(set(self.words)) != len(self.words):
            raise VocabError("vocabulary has duplicate words")
        self.index = {w: i for i, w in enumerate(self.words)}

    specials = SpecialIds()  # a class attribute, not a field: every vocabulary starts with SPECIALS

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, tokenized: Iterable[list[str]], min_count: int = 5) -> "Vocab":
        """Keep words seen at least ``min_count`` times; order by frequency then alphabetically. Counts every
        word's uses and the captions it ends (``non_final``)."""
        tokenized = [tokens for tokens in tokenized if tokens]
        counts = Counter(t for tokens in tokenized for t in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept, dict(counts), dict(Counter(tokens[-1] for tokens in tokenized)))

    def extended(self, other: "Vocab") -> "Vocab":
        """This vocabulary followed by ``other``'s words it lacks, in ``other``'s order, with their counts.

        Why appended: every old id keeps its word, so a trained model's rows stay valid (``--init-from``)."""
        new = [w for w in other.words[len(SPECIALS):] if w not in self.index]
        return Vocab(self.words + new, {**self.counts, **{w: other.counts.get(w, 0) for w in new}},
                     {**self.ends, **{w: other.ends[w] for w in new if w in other.ends}})

    def encode(self, tokens: list[str]) -> list[int]:
        """Token ids wrapped in <start> ... <end>; unknown words become <unk>."""
        return [self.specials.start] + [self.index.get(t, self.specials.unk) for t in tokens] + [self.specials.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of a generated id sequence, stopping at <end> and skipping <start>/<pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.specials.end:
                break
            if i in (self.specials.pad, self.specials.start):
                continue
            out.append(self.words[i])
        return out

    def rarity(self) -> list[float]:
        """Per id, how much rarer the word is in the training captions than the commonest word: log(top count /
        count), 0 for the special tokens (so ``<end>`` counts as common as "a" and the bonus does not lengthen
        captions by itself). ``DecodeConfig.specificity`` adds a multiple of it to each word's log-probability."""
        if not any(self.counts.get(w, 0) for w in self.words[len(SPECIALS):]):
            raise VocabError("this vocabulary has no word counts ('counts' in vocab.json), which specificity needs")
        top = max(self.counts.get(w, 0) for w in self.words[len(SPECIALS):])
        return [0.0] * len(SPECIALS) + [math.log(top / max(self.counts.get(w, 0), 1)) for w in self.words[len(SPECIALS):]]

    def non_final(self, min_end_rate: float) -> list[int]:
        """Ids of the words that end a training caption in fewer than ``min_end_rate`` of their uses there, which
        ``DecodeConfig.min_end_rate`` lets no caption end on: "and", "of", "a", and the adjectives of a
        noun phrase ("... playing with a red and black", an out-of-domain caption the matching reranker had
        chosen). Words the vocabulary has no counts for are not among them; a vocabulary without end counts
        (made before 2026-11-29) gives none."""
        if not self.ends:
            return []
        return [i for i, w in enumerate(self.words[len(SPECIALS):], len(SPECIALS))
                if self.counts.get(w, 0) and self.ends.get(w, 0) < min_end_rate * self.counts[w]]

    def ids(self, words: Iterable[str]) -> list[int]:
        """Ids of those of ``words`` this vocabulary has, in id order (``GENDERED_WORDS`` for neutral decoding)."""
        return sorted(self.index[w] for w in set(words) if w in self.index)

    def to_json(self) -> dict:
        ends = {w: self.ends[w] for w in self.words[4:] if self.ends.get(w)}
        return {"words": self.words, "counts": {w: self.counts.get(w, 0) for w in self.words[4:]},
                **({"ends": ends} if self.ends else {})}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if not path.is_file():
            raise VocabError(f"{path}: vocabulary file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            words, counts, ends = data["words"], data.get("counts", {}), data.get("ends", {})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise VocabError(f"{path}: not a captioner vocabulary ({err})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise VocabError(f"{path}: 'words' must be a list of strings")
        try:
            return cls(words, counts, ends)
        except VocabError as err:
            raise VocabError(f"{path}: {err}") from None
