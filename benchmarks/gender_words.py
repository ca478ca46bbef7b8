"""How captions name people's gender and age, against references that agree on it.

Reads the per-image files of ``captioner evaluate --per-image`` (each image's caption and references) and counts,
for the photos whose references agree the subject is female (at least 3 of the references use a female word and
none a male one) or male, how often the caption calls the subject female, male, a person, or a child; and, for
the photos whose references agree on an adult or on a child, how often the caption calls them young. Why: BLEU
does not show a woman called "a man"; a user does (MODEL_CARD "Limits", ``DecodeConfig.neutral``).

    captioner evaluate data/flickr8k --split val --from-cache --per-image val.json
    captioner evaluate data/flickr8k --split val --from-cache --neutral --per-image val-neutral.json
    python benchmarks/gender_words.py val.json val-neutral.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.tokenizer import tokenize  # noqa: E402

FEMALE_REF = {"woman", "women", "girl", "girls", "lady", "ladies", "she", "her"}
MALE_REF = {"man", "men", "boy", "boys", "guy", "he", "his"}
ADULT = {"man", "men", "woman", "women", "lady", "ladies", "guy", "guys"}
YOUNG = {"boy", "boys", "girl", "girls", "child", "children", "kid", "kids", "toddler", "baby"}
SAYS = {"female": {"woman", "women", "girl", "girls"}, "male": {"man", "men", "boy", "boys"},
        "person": {"person", "people"}, "child": {"child", "children", "kid", "kids"}, "young": YOUNG}


def agreed(references: list[str], one: set[str], other: set[str]) -> bool:
    """At least 3 references use a word of ``one`` and none a word of ``other``."""
    words = [set(tokenize(r)) for r in references]
    return sum(bool(w & one) for w in words) >= 3 and not any(w & other for w in words)


def count(rows: list[dict]) -> dict[str, dict[str, int]]:
    groups = {"female": (FEMALE_REF, MALE_REF), "male": (MALE_REF, FEMALE_REF), "adult": (ADULT, YOUNG),
              "young": (YOUNG, ADULT)}
    out = {}
    for name, (one, other) in groups.items():
        chosen = [set(tokenize(r["caption"])) for r in rows if agreed(r["references"], one, other)]
        out[name] = {"photos": len(chosen), **{f"says {s}": sum(bool(c & w) for c in chosen) for s, w in SAYS.items()},
                     # the misgendered: the other gender's words and none of the photo's own
                     **({"wrong gender": sum(bool(c & SAYS[wrong]) and not c & SAYS[name] for c in chosen)}
                        if (wrong := {"female": "male", "male": "female"}.get(name)) else {})}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("per_image", nargs="+", type=Path, help="files written by captioner evaluate --per-image")
    args = p.parse_args()
    for path in args.per_image:
        print(path)
        for group, counts in count(json.loads(path.read_text())).items():
            n = counts.pop("photos")
            print(f"  {group:6s} {n:4d} photos: " + ", ".join(f"{k} {v} ({v / max(n, 1):.0%})" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
