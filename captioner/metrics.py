"""Caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L) on pre-tokenized captions.

Why not call pycocoevalcap: it is the reference implementation, but it expects its own PTB
tokenizer (Java) in front of it. The project's tokenizer (``captioner.tokenizer.tokenize``) already
approximates that, so we score its tokens directly with pure-Python metrics that reproduce
pycocoevalcap's numbers (the tests check agreement to 1e-4); pycocoevalcap is a test-only dependency.

Inputs everywhere: ``refs`` maps image id -> list of reference token lists, ``hyps`` maps image id
-> one hypothesis token list. Both must cover the same image ids.
"""

from __future__ import annotations

import math
from collections import Counter

Refs = dict[int, list[list[str]]]
Hyps = dict[int, list[str]]

BLEU_ORDERS = 4


def _check_inputs(refs: Refs, hyps: Hyps) -> None:
    """Reject inputs that would silently score the wrong set of images or divide by zero."""
    if not refs:
        raise ValueError("no images to score: refs is empty")
    if refs.keys() != hyps.keys():
        only_refs = sorted(refs.keys() - hyps.keys())
        only_hyps = sorted(hyps.keys() - refs.keys())
        raise ValueError(
            "refs and hyps must cover the same image ids; "
            f"without hypothesis: {only_refs[:5]}{' ...' if len(only_refs) > 5 else ''} "
            f"({len(only_refs)}), "
            f"without references: {only_hyps[:5]}{' ...' if len(only_hyps) > 5 else ''} "
            f"({len(only_hyps)})"
        )
    empty = sorted(image_id for image_id, references in refs.items() if not references)
    if empty:
        raise ValueError(
            f"every image needs at least one reference; none for image ids {empty[:5]}"
            f"{' ...' if len(empty) > 5 else ''} ({len(empty)})"
        )


def bleu(refs: Refs, hyps: Hyps) -> dict[str, float]:
    """Corpus-level BLEU-1..4 against all references of each image, on a 0-1 scale.

    Built from nltk's parts rather than ``corpus_bleu`` because ``corpus_bleu`` counts at least one
    n-gram per hypothesis (``max(1, ...)``), so hypotheses shorter than n (including empty ones)
    inflate its denominators and it drifts from pycocoevalcap; here a hypothesis of length L
    contributes exactly ``max(0, L - n + 1)`` n-grams. BLEU-n is exactly 0 when some order up to n
    has no match (a geometric mean with a zero factor) instead of nltk's warning plus a ~1e-77 value.
    """
    # nltk on first use, not on import: its package import pulls scipy.stats (``tokenizer._treebank``)
    from nltk.translate.bleu_score import brevity_penalty, closest_ref_length, modified_precision

    _check_inputs(refs, hyps)
    matches = [0] * BLEU_ORDERS
    totals = [0] * BLEU_ORDERS
    hyp_len = ref_len = 0
    for image_id, references in refs.items():
        hypothesis = hyps[image_id]
        for order in range(1, BLEU_ORDERS + 1):
            # Clipped match count; the Fraction is unnormalized, so .numerator is the raw count.
            matches[order - 1] += modified_precision(references, hypothesis, order).numerator
            totals[order - 1] += max(0, len(hypothesis) - order + 1)
        hyp_len += len(hypothesis)
        ref_len += closest_ref_length(references, len(hypothesis))
    penalty = brevity_penalty(ref_len, hyp_len)

    scores = {}
    for order in range(1, BLEU_ORDERS + 1):
        if 0 in matches[:order]:
            scores[f"Bleu_{order}"] = 0.0
            continue
        log_precision = sum(math.log(matches[k] / totals[k]) for k in range(order)) / order
        scores[f"Bleu_{order}"] = penalty * math.exp(log_precision)
    return scores


def _ngram_counts(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of one caption."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) as computed by pycocoevalcap's ``cider_scorer.py``, one caption at a time.

    Matching pycocoevalcap means keeping its choices: document frequencies come from the references
    of the scored set itself (so the score depends on which images are scored together), hypothesis
    weights are clipped to the reference's (``min(hyp, ref)``) so repeating an n-gram does not pay, a
    gaussian penalty on the length difference punishes over/under-long captions, and the result is x10.
    Why a class: the references' tf-idf vectors are computed once, so self-critical training
    (``captioner.scst``) can score thousands of sampled captions per step against the training split's
    references; ``cider_d`` below is the same scorer averaged over one hypothesis per image.
    """

    def __init__(self, refs: Refs, sigma: float = 6.0, n: int = 4) -> None:
        self.sigma, self.n = sigma, n
        ref_counts = {image_id: [_ngram_counts(r, n) for r in references] for image_id, references in refs.items()}
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for counts in ref_counts.values():
            self.document_frequency.update(set().union(*counts))
        self.log_num_images = math.log(len(refs))
        self.refs = {image_id: [(len(reference), *self._tfidf(counts)) for reference, counts in zip(references, ref_counts[image_id])]
                     for image_id, references in refs.items()}

    def _tfidf(self, counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
        """Per-order tf-idf vectors and their L2 norms (n-grams unseen in references get df 1)."""
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        for ngram, term_freq in counts.items():
            idf = self.log_num_images - math.log(max(1.0, self.document_frequency[ngram]))
            vectors[len(ngram) - 1][ngram] = term_freq * idf
        return vectors, [math.sqrt(sum(w * w for w in v.values())) for v in vectors]

    def score(self, image_id: int, hypothesis: list[str]) -> float:
        """CIDEr-D of one tokenized caption of ``image_id`` against that image's references."""
        return self.scores([image_id], hypothesis)[0]

    def scores(self, image_ids: list[int], hypothesis: list[str]) -> list[float]:
        """``score`` of one caption against each of several images' references; its tf-idf vectors are computed
        once (consensus reranking compares each candidate with the captions of many photos)."""
        hyp_vecs, hyp_norms = self._tfidf(_ngram_counts(hypothesis, self.n))
        return [self._similarity(image_id, hypothesis, hyp_vecs, hyp_norms) for image_id in image_ids]

    def _similarity(self, image_id: int, hypothesis: list[str], hyp_vecs: list[dict[tuple[str, ...], float]],
                    hyp_norms: list[float]) -> float:
        references = self.refs[image_id]
        total = 0.0
        for ref_len, ref_vecs, ref_norms in references:
            length_penalty = math.exp(-((len(hypothesis) - ref_len) ** 2) / (2 * self.sigma**2))
            for hyp_vec, ref_vec, hyp_norm, ref_norm in zip(hyp_vecs, ref_vecs, hyp_norms, ref_norms):
                if hyp_norm and ref_norm:
                    dot = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in hyp_vec.items())
                    total += dot / (hyp_norm * ref_norm) * length_penalty
        return 10.0 * total / (self.n * len(references))


def cider_d(refs: Refs, hyps: Hyps, sigma: float = 6.0, n: int = 4) -> float:
    """CIDEr-D of one hypothesis per image, mean over images (document frequencies from ``refs``: ``CiderD``)."""
    _check_inputs(refs, hyps)
    scorer = CiderD(refs, sigma, n)
    return sum(scorer.score(image_id, hyps[image_id]) for image_id in refs) / len(refs)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme)."""
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(refs: Refs, hyps: Hyps, beta: float = 1.2) -> float:
    """ROUGE-L as computed by pycocoevalcap's ``rouge.py``, mean over images.

    Like pycocoevalcap, precision and recall are each maximised over the references separately
    (they may come from different references) before the F-measure; beta > 1 favours recall.
    """
    _check_inputs(refs, hyps)
    scores = []
    for image_id, references in refs.items():
        hypothesis = hyps[image_id]
        lcs = [_lcs_length(reference, hypothesis) for reference in references]
        precision = max(lcs) / len(hypothesis) if hypothesis else 0.0
        recall = max((m / len(r) for m, r in zip(lcs, references) if r), default=0.0)
        if precision and recall:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores)


def score_all(refs: Refs, hyps: Hyps) -> dict[str, float]:
    """All metrics under pycocoevalcap's names: ``Bleu_1..Bleu_4`` (0-1), ``CIDEr`` (~0-10), ``ROUGE_L``.

    Raises ValueError when refs and hyps cover different image ids or an image has no references;
    empty hypotheses are allowed and score 0. (Each metric validates its inputs.)
    """
    return {**bleu(refs, hyps), "CIDEr": cider_d(refs, hyps), "ROUGE_L": rouge_l(refs, hyps)}
