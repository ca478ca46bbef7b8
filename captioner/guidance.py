"""Between feature and caption: what the encoder's ImageNet head recognises, as caption words.

Why: a frozen CNN and 6,000 captioned photos give a decoder that says "a dog" for an eagle, yet the
same CNN's classifier head knows it is a bald eagle. ``Tagger`` turns the head's 1,000 class
probabilities into probabilities of vocabulary words (every class adds its probability to its word:
120 dog breeds make "dog"), through ``imagenet_words.json`` (WordNet hypernyms, derived by
``data_prep/imagenet_words.py``). Guided decoding then requires a caption to contain a word that is
recognised above a threshold (``decoding._beam`` with constraints); the app shows the tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from .encoder import Encoder
from .errors import EncoderError

WORDS_FILE = Path(__file__).resolve().parent / "imagenet_words.json"
# the 1,000 ImageNet-1k class names, shared by every torchvision IMAGENET1K weights
IMAGENET_CATEGORIES: list[str] = torchvision.models.get_model_weights("resnet50")["IMAGENET1K_V1"].meta["categories"]
# Which classes may force their word into a caption: a photo's subject. Measured on Flickr8k val (beam 3,
# threshold 0.7, bundled model): objects and clothing ("ball", "skis", "swimsuit") forced in cost CIDEr-D.
GUIDE_KINDS = ("animal", "vehicle")
MIN_WORD_COUNT = 10  # a tag word must occur this often in the training captions: the decoder knows how to use it


@dataclass
class Tag:
    """A caption word the encoder recognises, its probability and the ImageNet class that gave most of it."""

    word: str
    prob: float
    imagenet_class: str


class Tagger:
    """ImageNet head probabilities -> probabilities of caption words of one vocabulary.

    Each class is named by the more frequent (in the training captions) of its two closest known
    words: a golden retriever is a "dog" rather than a "retriever", a moped a "motorcycle"; the other
    stays an accepted synonym when guiding.
    """

    def __init__(self, encoder: Encoder, words: list[str], counts: dict[str, int], categories: list[str],
                 guide_kinds: tuple[str, ...] = GUIDE_KINDS) -> None:
        if encoder.head is None:
            raise EncoderError("tags, guided decoding and the tag bonus need the encoder's ImageNet classifier head, "
                               "and this model has none")
        table = json.loads(WORDS_FILE.read_text())
        if len(categories) != len(table["classes"]):
            raise EncoderError(f"guided decoding needs an ImageNet-1k head ({len(table['classes'])} classes), "
                               f"this encoder has {len(categories)}")
        self.encoder, self.categories, self.words = encoder, categories, words
        index = {w: i for i, w in enumerate(words)}

        def singular(word: str) -> str:
            """WordNet names cattle by plural lemmas ("cows", "oxen"): a tag names one, as most captions do."""
            one = word[:-1]
            return one if word.endswith("s") and one in index and counts.get(one, 0) > counts.get(word, 0) else word

        known = [list(dict.fromkeys(index[singular(w)] for w in cands if counts.get(w, 0) >= MIN_WORD_COUNT
                                    and w in index))[:2] for cands in table["classes"]]
        self.synonyms = known  # class -> up to two vocabulary ids
        # class -> vocabulary id of its name, or -1 (no known word)
        self.class_word = torch.tensor([max(ids, key=lambda i: counts.get(words[i], 0)) if ids else -1 for ids in known])
        self.guides = torch.tensor([kind in guide_kinds for kind in table["kinds"]])  # class may constrain
        # vocabulary id -> the id whose probability its tag bonus takes (itself, or its singular for a plural the
        # vocabulary has: "dogs" as "dog"), -1 for words no guiding class is named by
        self.bonus_source = torch.full((len(words),), -1)
        # vocabulary id -> the id of the word's other number form ("dog" <-> "dogs"), or itself: the tag bonus
        # counts once per word, and a noun and its plural are one word there ("two dogs are playing with a dog"
        # earned it twice)
        self.number_partner = torch.arange(len(words))
        for word in {words[i] for i in self.class_word[self.guides & (self.class_word >= 0)].tolist()}:
            for form in (word, word + "s", word + "es"):
                if form in index:
                    self.bonus_source[index[form]] = index[word]
                    if form != word:
                        self.number_partner[index[form]], self.number_partner[index[word]] = index[word], index[form]

    @torch.no_grad()
    def word_probs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) pooled features -> (B, V) word probabilities and the (B, 1000) class probabilities."""
        probs = torch.softmax(self.encoder.classify(features).float(), dim=-1)  # (B, 1000)
        mapped = self.class_word.to(probs.device)
        known = mapped >= 0
        words = probs.new_zeros(probs.shape[0], len(self.words))
        words.index_add_(1, mapped[known], probs[:, known])  # each class adds its probability to its word
        return words, probs

    @torch.no_grad()
    def word_bonus(self, features: torch.Tensor, weight: float) -> torch.Tensor:
        """(B, D) features -> (B, V): ``weight`` x the probability of each word a guiding class (an animal, a
        vehicle) is named by, and of its plurals; 0 for every other word (``DecodeConfig.tag_bonus``)."""
        words, _ = self.word_probs(features)
        source = self.bonus_source.to(words.device)
        return weight * words[:, source.clamp(min=0)] * (source >= 0)

    def tags(self, features: torch.Tensor, threshold: float = 0.0, top: int = 5) -> list[list[Tag]]:
        """Per image, up to ``top`` recognised caption words with probability >= ``threshold``, best first."""
        return [[tag for tag, _ in found] for found in self._tags(features, threshold, top)]

    def _tags(self, features: torch.Tensor, threshold: float, top: int) -> list[list[tuple[Tag, int]]]:
        words, probs = self.word_probs(features)
        mapped = self.class_word.to(probs.device)
        values, ids = words.topk(min(top, words.shape[1]), dim=1)  # (B, top)
        # the class behind most of each tag: its most probable class among those named by that word
        behind = (probs[:, None, :] * (mapped[None, None, :] == ids[:, :, None])).argmax(-1)  # (B, top)
        return [[(Tag(self.words[i], round(p, 4), self.categories[c]), c) for p, i, c in zip(vals, idx, cls)
                 if p >= threshold and p > 0]
                for vals, idx, cls in zip(values.tolist(), ids.tolist(), behind.tolist())]

    def constraints(self, features: torch.Tensor, threshold: float, vocab_words: dict[str, int]) -> list[list[int]]:
        """Per image, the token ids a guided caption must contain one of: the most probable tag word
        and its class's synonym (with plurals the vocabulary has), if it reaches ``threshold`` and its
        class is of a kind that names a subject (``GUIDE_KINDS``); else nothing."""
        out = []
        for found in self._tags(features, threshold, top=1):
            ids: list[int] = []
            for tag, cls in found:
                if not self.guides[cls]:
                    continue
                for word in {tag.word, *(self.words[i] for i in self.synonyms[cls])}:
                    ids += [vocab_words[w] for w in (word, word + "s", word + "es") if w in vocab_words]
            out.append(sorted(set(ids)))
        return out
