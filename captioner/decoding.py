"""Step 4 of the data flow: image features -> token sequences. One implementation for app, CLI, evaluation.

Every strategy runs batched: all images (and, for beam search, all their beams) advance together as
one (N, ...) tensor on the model's device; finished hypotheses are masked (they may only emit
``<pad>`` at zero cost) and the loop stops as soon as every hypothesis has finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError
from .model import CaptionDecoder, State
from .options import check_names, check_types
from .vocab import SpecialIds

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class DecodeConfig:
    """Decoding options; ``asdict`` of this is recorded next to every evaluation."""

    strategy: str = "greedy"
    max_len: int = 30
    beam_size: int = 3
    length_penalty: float = 0.0  # alpha in logprob / len**alpha (0: raw log-probability)
    num_return: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    no_repeat_ngram: int = 0  # 0: off; n: never repeat an n-gram within one caption
    suppress_unk: bool = True
    # Gender-neutral: never use a word that states a person's gender (``vocab.GENDERED_WORDS``): the decoder then
    # says "a person", "a child", "two people". Costs some BLEU against references that guess gender (MODEL_CARD
    # "Limits").
    neutral: bool = False
    # A caption may end on a word only if at least this share of the word's uses in the training captions end one
    # (``Vocab.non_final``): never on "and", "of" or a dangling adjective ("... playing with a red and black").
    # 1 %: on Flickr8k val 4 of 1,000 default captions change, BLEU-4 / CIDEr-D equal or up (MODEL_CARD). 0: off.
    min_end_rate: float = 0.01
    seed: int | None = None
    # Guided decoding (beam only): the caption must name what the encoder's ImageNet head recognises
    # with at least this probability, when the vocabulary has a word for it (``captioner/guidance.py``).
    guide: bool = False
    guide_threshold: float = 0.7  # chosen on Flickr8k val (MODEL_CARD.md): 0.3-0.9 all beat unguided
    # Consensus reranking (beam only): order the beam's captions by their mean CIDEr-D against the captions of
    # this many nearest training photos, plus ``consensus_weight`` x the model's score (``captioner/consensus.py``;
    # needs the checkpoint's consensus index). 0: off.
    consensus: int = 0
    consensus_weight: float = 0.1
    # Matching reranking (beam only): order the beam's captions by the model's score + this x the cosine between
    # the photo and each caption in the checkpoint's matching model (``captioner/matching.py``). 0: off.
    match_weight: float = 0.0
    # Specificity (beam only): hypotheses are ranked by their log-probability + this x the rarity of each word in
    # the training captions (``Vocab.rarity``), a prior that favours the specific word ("poodle", "skateboarder")
    # over the generic one ("dog", "man") when the model finds both likely; the hypotheses' log-probabilities stay
    # the model's. Each word's bonus counts once per caption (a repeated word earns nothing). More varied words for
    # some BLEU (MODEL_CARD "Specificity"). 0: off.
    specificity: float = 0.0
    # Specificity by fit (beam, with the checkpoint's matching model): the beam is decoded at each of these
    # specificities at once (each level's captions reranked by ``match_weight`` as usual), and each photo keeps the
    # level whose caption matches it best, a level s paying ``specificity_cost`` x s of cosine: a rarer word where
    # the matching model finds it fits the photo, the plain caption where it does not. One fixed specificity
    # trades accuracy for words on every photo; choosing per photo gives more words for less (MODEL_CARD
    # "Specificity by fit"). () or None: off; then ``specificity`` must be 0.
    specificity_levels: tuple[float, ...] = ()
    specificity_cost: float = 0.15  # cosine per unit of specificity: the bundled model's choice on val
    # Tag bonus (beam only; needs the encoder's ImageNet head): a hypothesis using a word the head recognises as a
    # photo's subject (an animal or a vehicle: ``guidance.GUIDE_KINDS``) ranks higher by this x the head's
    # probability of the word, once per caption, as a specificity bonus does. Guidance forces a word the head is
    # sure of (``guide_threshold``); this tips the beam where the decoder finds two words likely and the head
    # prefers the rarer one ("a cat" over "a dog" at P(cat) 0.4), below the threshold too. 0: off.
    tag_bonus: float = 0.0

    def __post_init__(self) -> None:
        if self.specificity_levels is None:
            self.specificity_levels = ()  # None reads as "off" too
        check_types(self)
        self.specificity_levels = tuple(float(s) for s in self.specificity_levels)  # decoding.json gives a list
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_len < 1 or self.beam_size < 1 or self.num_return < 1:
            raise ConfigError("max_len, beam_size and num_return must be >= 1")
        if self.strategy == "beam" and self.num_return > self.beam_size:
            raise ConfigError(f"num_return ({self.num_return}) cannot exceed beam_size ({self.beam_size})")
        if self.strategy == "greedy" and self.num_return != 1:
            raise ConfigError("greedy decoding returns one caption; use beam or sample for several")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.no_repeat_ngram < 0:
            raise ConfigError("need temperature > 0, 0 < top_p <= 1, top_k >= 0, no_repeat_ngram >= 0")
        if self.guide and self.strategy != "beam":
            raise ConfigError("guided decoding is a constrained beam search: use it with strategy 'beam'")
        if self.consensus < 0 or self.consensus_weight < 0:
            raise ConfigError("need consensus >= 0 (neighbours; 0: off) and consensus_weight >= 0")
        if self.consensus and self.strategy != "beam":
            raise ConfigError("consensus reranking reorders a beam's captions: use it with strategy 'beam'")
        if self.match_weight < 0 or (self.match_weight and self.strategy != "beam"):
            raise ConfigError("matching reranking reorders a beam's captions: use match_weight >= 0 with strategy 'beam'")
        if self.match_weight and self.consensus:
            raise ConfigError("choose one reranking: consensus or match_weight")
        if self.specificity < 0 or (self.specificity and self.strategy != "beam"):
            raise ConfigError("specificity ranks a beam's hypotheses: use specificity >= 0 with strategy 'beam'")
        if self.specificity_levels:
            if self.strategy != "beam" or self.specificity or self.consensus:
                raise ConfigError("specificity_levels choose a beam's specificity per photo: use them with strategy "
                                  "'beam', without a fixed specificity and without consensus reranking")
            if min(self.specificity_levels) < 0 or len(set(self.specificity_levels)) < 2:
                raise ConfigError(f"specificity_levels must be two or more distinct values >= 0, got "
                                  f"{self.specificity_levels}")
        if self.specificity_cost < 0:
            raise ConfigError(f"specificity_cost must be >= 0, got {self.specificity_cost}")
        if self.tag_bonus < 0 or (self.tag_bonus and self.strategy != "beam"):
            raise ConfigError("the tag bonus ranks a beam's hypotheses: use tag_bonus >= 0 with strategy 'beam'")
        if not 0 <= self.min_end_rate < 1:
            raise ConfigError(f"min_end_rate must be in [0, 1), got {self.min_end_rate}")
        if not 0 < self.guide_threshold <= 1:
            raise ConfigError(f"guide_threshold must be in (0, 1], got {self.guide_threshold}")

    def to_json(self) -> dict:
        return {**asdict(self), "specificity_levels": list(self.specificity_levels)}  # as JSON gives it back

    def describe(self) -> str:
        """The setting as people say it: "greedy", "beam 5 (length penalty 0.8), guided"."""
        beam = f" {self.beam_size}" + (f" (length penalty {self.length_penalty})" if self.length_penalty else "")
        consensus = f", consensus of {self.consensus} neighbours (weight {self.consensus_weight})" if self.consensus else ""
        match = f", reranked by image-caption match (weight {self.match_weight})" if self.match_weight else ""
        specific = f", specificity {self.specificity}" if self.specificity else ""
        if self.specificity_levels:
            levels = "/".join(f"{s:g}" for s in self.specificity_levels)
            specific = f", specificity by fit ({levels}, cost {self.specificity_cost})"
        specific += f", tag bonus {self.tag_bonus:g}" if self.tag_bonus else ""
        norepeat = f", no repeated {self.no_repeat_ngram}-grams" if self.no_repeat_ngram else ""
        ends = "" if self.min_end_rate == DecodeConfig.min_end_rate else f", min end rate {self.min_end_rate:g}"
        return (f"{self.strategy}{beam if self.strategy == 'beam' else ''}{', guided' if self.guide else ''}{specific}"
                f"{consensus}{match}{norepeat}{ends}{', gender-neutral' if self.neutral else ''}")


def plain_options(**options) -> dict:
    """``options`` over every other ``DecodeConfig`` option at its own default, ``max_len`` left to the model.

    Passed to ``Captioner.caption`` or ``Captioner.decode_config`` they leave nothing to the checkpoint's
    ``decoding.json``: ``plain_options(strategy="beam", beam_size=3)`` is plain beam search, where
    ``strategy="beam", beam_size=3`` alone keeps the model's other recommended beam settings (the bundled model's
    five specificity levels, its matching reranking, no repeated 4-grams: 5x the work of plain beam 3). Why a
    helper: a measurement labelled "beam 3" inherited all of those until 2026-11-30 (benchmarks/README.md)."""
    check_names(DecodeConfig, options)
    return {**{k: v for k, v in asdict(DecodeConfig()).items() if k != "max_len"}, **options}


@dataclass
class Hypothesis:
    """One caption: token ids (no <start>/<end>), total log-probability, and the ranking score."""

    tokens: list[int]
    logprob: float
    score: float


def _penalised(logprob: torch.Tensor, length: torch.Tensor, alpha: float) -> torch.Tensor:
    return logprob if alpha == 0 else logprob / length.clamp(min=1).float() ** alpha


def _ban(logp: torch.Tensor, history: torch.Tensor, config: DecodeConfig, specials: SpecialIds,
         banned: torch.Tensor | None = None, non_final: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (N, V) log-probs: <pad>/<start> always, <unk> if suppressed, the ``banned`` ids if ``config.neutral``,
    <end> right after a ``non_final`` word, tokens completing a seen n-gram."""
    logp[:, specials.pad] = logp[:, specials.start] = float("-inf")  # two column fills: no index tensor per step
    if config.suppress_unk:
        logp[:, specials.unk] = float("-inf")
    if config.neutral:
        logp[:, banned] = float("-inf")
    if non_final is not None and history.shape[1]:
        logp[:, specials.end] = logp[:, specials.end].masked_fill(non_final[history[:, -1]], float("-inf"))
    n = config.no_repeat_ngram
    if n and history.shape[1] >= n:
        windows = history.unfold(1, n, 1)  # (N, W, n)
        prefix = history[:, history.shape[1] - n + 1:]  # (N, n-1)
        match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, W)
        # -inf at each matching window's next token: a min-scatter of -inf (match) or +inf (no match, no change)
        # over the windows, one operation on (N, W) where a mask of hits took three passes over (N, V)
        fill = torch.full(match.shape, float("inf"), dtype=logp.dtype, device=logp.device).masked_fill_(match, float("-inf"))
        logp.scatter_reduce_(1, windows[:, :, -1], fill, reduce="amin")
    return logp


def _need_banned(config: DecodeConfig, banned: torch.Tensor | None) -> None:
    if config.neutral and banned is None:
        raise ConfigError("gender-neutral decoding needs the vocabulary's gendered word ids (Vocab.ids)")


def _step(decoder: CaptionDecoder, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    logits, state = decoder.step(tokens, state)
    return torch.log_softmax(logits.float(), dim=-1), state  # (N, V)


DEDUP_MIN_ROWS = 64  # fewer rows: a step costs too little for the bookkeeping


def _repeats(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, inverse)`` when some rows repeat another exactly (the same previous token and the same state, so
    the same next distribution and state): ``tokens[first][inverse]`` is ``tokens``, likewise the state. None
    when no row repeats. Rows are grouped by the token and a random projection of the state, then every grouped
    row is compared in full with its group's first, so a projection that fails to tell two rows apart only costs
    the saving (None), never a wrong row."""
    n = tokens.shape[0]
    flat = torch.cat([s.transpose(0, 1).reshape(n, -1) for s in state], 1).float()  # (N, layers x hidden x parts)
    probe = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=flat.dtype)
    key = torch.stack([tokens.to(flat.dtype), flat @ probe], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    groups = int(inverse.max()) + 1
    if groups == n:
        return None
    first = torch.full((groups,), n, dtype=torch.long).scatter_reduce_(0, inverse, torch.arange(n), "amin")
    rep = first[inverse]
    if not (torch.equal(tokens[rep], tokens) and torch.equal(flat[rep], flat)):
        return None
    return first, inverse


def _step_unfinished(decoder: CaptionDecoder, tokens: torch.Tensor, state: State,
                     finished: torch.Tensor, dedup: bool = False) -> tuple[torch.Tensor, State]:
    """``_step`` for the unfinished rows only: most of a batch ends well before its longest caption,
    and a finished row's next distribution is fixed anyway. Finished rows get placeholder log-probs
    (``_freeze_finished`` overwrites them) and keep their old state.

    ``dedup`` (beam search on a CPU): a row that repeats another exactly (``_repeats``) is not stepped again but
    given its twin's result. Why: the default decoding runs one beam per specificity level (five for the bundled
    model) and the levels' beams share their first words: 57 % of the rows it steps repeat another
    (benchmarks/README.md).
    With FBGEMM's step (x86) a row's products do not depend on the rows beside it: identical n-best lists on the
    1,000 val photos and in tests/test_decoding.py. Where fewer rows move a step to another runtime
    (``CaptionDecoder.step``), the numbers agree up to float rounding, as between runtimes."""
    active = (~finished).nonzero()[:, 0]
    stepped, inverse = active, None  # the rows stepped; each active row's among them
    if dedup and tokens.device.type == "cpu" and active.numel() >= DEDUP_MIN_ROWS:
        found = _repeats(tokens[active], tuple(s.index_select(1, active) for s in state))
        if found is not None:
            stepped, inverse = active[found[0]], found[1]
    if stepped.numel() == tokens.shape[0]:  # every row, once
        return _step(decoder, tokens, state)
    logp_stepped, new = _step(decoder, tokens[stepped], tuple(s.index_select(1, stepped) for s in state))
    if inverse is not None:
        logp_stepped, new = logp_stepped[inverse], tuple(n.index_select(1, inverse) for n in new)
    logp = logp_stepped.new_zeros((tokens.shape[0], logp_stepped.shape[1]))
    logp[active] = logp_stepped
    return logp, tuple(s.index_copy(1, active, n.to(s.dtype)) for s, n in zip(state, new))


def _freeze(logp: torch.Tensor, finished: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Finished rows may only continue with <pad>, at no cost; no host synchronisation (``greedy_static``)."""
    pad = logp[:, pad_id].masked_fill(finished, 0.0)
    logp.masked_fill_(finished[:, None], float("-inf"))  # in place: every caller's logp is its own fresh tensor
    logp[:, pad_id] = pad
    return logp


def _freeze_finished(logp: torch.Tensor, finished: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``_freeze``, skipped while no row has finished (most steps of a batch)."""
    return _freeze(logp, finished, pad_id) if finished.any() else logp


@torch.no_grad()
def decode(decoder: CaptionDecoder, features: torch.Tensor, config: DecodeConfig,
           specials: SpecialIds = SpecialIds(), constraints: list[list[int]] | None = None,
           rarity: torch.Tensor | None = None, banned: torch.Tensor | None = None,
           non_final: torch.Tensor | None = None, tag_bonus: torch.Tensor | None = None,
           partner: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """(B, D) features -> for each image, ``num_return`` hypotheses best first.

    ``specials``: the vocabulary's special token ids (``vocab.specials``; every vocabulary has the default ones).

    ``constraints`` (beam only): per image, token ids of which the caption must contain at least one
    (an empty list leaves that image unconstrained).

    ``rarity``: (V,) ``Vocab.rarity`` on the decoder's device; needed when ``config.specificity`` or
    ``config.specificity_levels`` is set.

    ``banned``: token ids on the decoder's device that never appear when ``config.neutral`` is set
    (``Vocab.ids(GENDERED_WORDS)``); needed then, ignored otherwise.

    ``non_final``: (V,) bool on the decoder's device, the words no caption may end on
    (``Vocab.non_final(config.min_end_rate)``, which ``Captioner.generate`` passes); None: any.

    ``tag_bonus``: (B, V) per image, ``config.tag_bonus`` x the head's probability of each word it names
    (``Tagger.word_bonus``); needed when ``config.tag_bonus`` is set. Added to the specificity bonus. ``partner``:
    (V,) each word's other number form or itself (``Tagger.number_partner``): with it a word and its partner earn
    one bonus between them.

    With ``config.specificity_levels`` the beam runs at every level at once and the answer has one row per
    (level, image), level-major: ``len(levels) * B`` rows (``Captioner.generate`` picks each image's level).
    """
    if (config.specificity or config.specificity_levels) and rarity is None:
        raise ConfigError("specificity needs the vocabulary's word rarity (Vocab.rarity)")
    _need_banned(config, banned)
    if config.strategy != "beam":
        return _sample(decoder, features, config, specials, banned, non_final)
    if config.tag_bonus and tag_bonus is None:
        raise ConfigError("the tag bonus needs the words' bonus per image (Tagger.word_bonus)")
    tag_bonus, partner = (tag_bonus, partner) if config.tag_bonus else (None, None)
    if not config.specificity_levels:
        bonus = config.specificity * rarity[None] if config.specificity else None
        if tag_bonus is not None:
            bonus = tag_bonus if bonus is None else bonus + tag_bonus
        return _beam_split(decoder, features, config, specials, constraints, bonus, banned, non_final, partner=partner)
    levels = torch.tensor(config.specificity_levels, device=features.device, dtype=rarity.dtype)
    n = len(levels)
    bonus = levels.repeat_interleave(features.shape[0])[:, None] * rarity[None]
    if tag_bonus is not None:
        bonus = bonus + tag_bonus.repeat(n, 1)
    return _beam_split(decoder, features.repeat(n, 1), config, specials,
                       None if constraints is None else constraints * n, bonus, banned, non_final,
                       dedup=True, partner=partner)  # each photo n times: its levels' beams share their first words


def _beam_split(decoder: CaptionDecoder, features: torch.Tensor, config: DecodeConfig, specials: SpecialIds,
                constraints: list[list[int]] | None, bonus: torch.Tensor | None, banned: torch.Tensor | None,
                non_final: torch.Tensor | None, dedup: bool = False,
                partner: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """``_beam``, the photos without a constraint word decoded apart as a plain beam search (one group of beams).

    Why: a constrained search keeps two groups of beams per photo for the whole batch, and every step builds,
    masks and ranks candidates for both, though an unconstrained photo never reaches group 1 and decodes as plain
    beam search would (``tests/test_guidance.py``); with guidance on by default most photos have no recognised word."""
    if constraints is not None and not any(constraints):
        constraints = None
    if constraints is None or all(constraints):
        return _beam(decoder, features, config, specials, constraints, bonus, banned, non_final, dedup, partner)
    out: list[list[Hypothesis]] = [[] for _ in constraints]
    for constrained in (True, False):
        rows = [i for i, c in enumerate(constraints) if bool(c) == constrained]
        index = torch.tensor(rows, device=features.device)
        part_bonus = None if bonus is None else bonus if bonus.shape[0] == 1 else bonus[index]
        found = _beam(decoder, features[index], config, specials,
                      [constraints[i] for i in rows] if constrained else None, part_bonus, banned, non_final, dedup,
                      partner)
        for i, hyps in zip(rows, found):
            out[i] = hyps
    return out


def _finish(tokens: torch.Tensor, logprob: torch.Tensor, score: torch.Tensor,
            specials: SpecialIds) -> list[Hypothesis]:
    out = []
    for row, lp, sc in zip(tokens.tolist(), logprob.tolist(), score.tolist()):
        words = []
        for t in row:
            if t in (specials.end, specials.pad):
                break
            words.append(t)
        out.append(Hypothesis(words, lp, sc))
    return out


def _sample(decoder: CaptionDecoder, features: torch.Tensor, config: DecodeConfig,
            specials: SpecialIds, banned: torch.Tensor | None = None,
            non_final: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Greedy (argmax) or ancestral sampling; ``num_return`` independent samples per image."""
    b, r = features.shape[0], config.num_return
    device = features.device
    feats = features.repeat_interleave(r, dim=0)  # (B*r, D)
    state = decoder.init_state(feats)
    n = feats.shape[0]
    prev = torch.full((n,), specials.start, dtype=torch.long, device=device)
    history = torch.empty((n, 0), dtype=torch.long, device=device)
    logprob = torch.zeros(n, device=device)
    length = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    generator = None
    if config.strategy == "sample" and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    for _ in range(config.max_len):
        logp, state = _step_unfinished(decoder, prev, state, finished)
        logp = _freeze_finished(_ban(logp, history, config, specials, banned, non_final), finished, specials.pad)
        if config.strategy == "greedy":
            nxt = logp.argmax(-1)
        else:
            nxt = _draw(logp, config, generator)
        logprob += logp.gather(1, nxt[:, None])[:, 0]
        length += (~finished).long()
        finished |= nxt == specials.end
        history = torch.cat([history, nxt[:, None]], dim=1)
        prev = nxt
        if finished.all():
            break
    score = _penalised(logprob, length, config.length_penalty)
    hyps = _finish(history, logprob, score, specials)
    groups = [hyps[i * r:(i + 1) * r] for i in range(b)]
    return [sorted(g, key=lambda h: -h.score) for g in groups]


def greedy_static(decoder: CaptionDecoder, features: torch.Tensor, config: DecodeConfig, specials: SpecialIds,
                  banned: torch.Tensor | None = None,
                  non_final: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy decoding with static shapes and no host synchronisation, so that it can be recorded as one CUDA
    graph (``captioner/graphs.py``): every row runs every one of the ``max_len`` steps on the whole batch.
    The answers are ``_sample``'s: a finished row may only continue with ``<pad>`` at no cost, so the extra
    steps add nothing, and a row's numbers do not depend on the other rows.

    (B, D) features -> tokens (B, max_len) ending in ``<end>`` then ``<pad>``, logprob (B,), length (B,);
    ``finish_static`` turns them into hypotheses.
    """
    _need_banned(config, banned)
    n, device = features.shape[0], features.device
    state = decoder.init_state(features)
    prev = torch.full((n,), specials.start, dtype=torch.long, device=device)
    history = torch.full((n, config.max_len), specials.pad, dtype=torch.long, device=device)
    logprob = torch.zeros(n, device=device)
    length = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(config.max_len):
        logp, state = _step(decoder, prev, state)
        logp = _freeze(_ban(logp, history[:, :t], config, specials, banned, non_final), finished, specials.pad)
        nxt = logp.argmax(-1)
        logprob += logp.gather(1, nxt[:, None])[:, 0]
        length += (~finished).long()
        finished |= nxt == specials.end
        history[:, t] = nxt
        prev = nxt
    return history, logprob, length


def finish_static(tokens: torch.Tensor, logprob: torch.Tensor, length: torch.Tensor, config: DecodeConfig,
                  specials: SpecialIds) -> list[list[Hypothesis]]:
    """``greedy_static``'s tensors -> per image its one hypothesis, as ``decode`` returns it."""
    return [[h] for h in _finish(tokens, logprob, _penalised(logprob, length, config.length_penalty), specials)]


def _draw(logp: torch.Tensor, config: DecodeConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row after temperature, top-k and top-p (nucleus) filtering."""
    logits = logp / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= config.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _beam(decoder: CaptionDecoder, features: torch.Tensor, config: DecodeConfig, specials: SpecialIds,
          constraints: list[list[int]] | None = None, bonus: torch.Tensor | None = None,
          banned: torch.Tensor | None = None, non_final: torch.Tensor | None = None,
          dedup: bool = False, partner: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Batched beam search ranked by the penalised score ``logprob / len**alpha`` at every step; ``dedup``: rows
    that repeat another are stepped once (``_step_unfinished``), for batches that hold each photo several times.

    With a ``bonus`` ((1, V) for all images or (B, V) per image: specificity x the words' rarity, plus the tag
    bonus) the ranking sum is ``logprob + the words' bonus`` instead, each word's bonus counted once per caption
    (``_unused``; a word and its ``partner`` once between them): it is carried beside the true log-probability
    (``rank``), which the hypotheses report.

    With ``constraints`` it is a constrained beam search (Anderson et al., 2017) for one disjunctive
    constraint: each image keeps two beams of ``k`` hypotheses, group 0 (no constraint word yet) and
    group 1 (one seen). A constraint word moves a group-0 hypothesis into group 1; the answer comes
    from group 1 when it holds a hypothesis, else from group 0 (an unconstrained image never
    reaches group 1, so it decodes exactly like plain beam search).
    """
    b, k, alpha = features.shape[0], config.beam_size, config.length_penalty
    g = 1 if constraints is None else 2
    device = features.device
    state = decoder.init_state(features.repeat_interleave(g * k, dim=0))  # each (L, B*g*k, H)
    n = b * g * k
    prev = torch.full((n,), specials.start, dtype=torch.long, device=device)
    history = torch.empty((n, 0), dtype=torch.long, device=device)
    logprob = torch.full((b, g, k), float("-inf"), device=device)
    logprob[:, 0, 0] = 0.0  # all beams start identical: keep one alive, group 1 starts empty
    length = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    sources = _group_sources(constraints, b, decoder.config.vocab_size, device)
    # bonus: (1 or B, V); 0 for <pad>, so finished rows keep their sum
    bonus = None if bonus is None else bonus.view(-1, 1, 1, bonus.shape[-1])
    rank = logprob
    for _ in range(config.max_len):
        # Empty slots (logprob -inf: the first step's copies of the start, a photo's group 1 until its recognised
        # word is used) are not stepped: whatever their placeholder log-probs, their candidates stay at -inf.
        empty = logprob.view(-1) == float("-inf")
        logp, state = _step_unfinished(decoder, prev, state, finished | empty, dedup)  # (B*g*k, V)
        logp = _freeze_finished(_ban(logp, history, config, specials, banned, non_final), finished, specials.pad)
        v = logp.shape[-1]
        cand = logprob[..., None] + logp.view(b, g, k, v)  # (B, g, k, V)
        # rank + (logp + bonus), summed in place into _unused's fresh tensor (the same sums: a + b == b + a)
        cand_rank = cand if bonus is None else _unused(bonus, history, (b, g, k, v), partner).add_(
            logp.view(b, g, k, v)).add_(rank[..., None])
        cand_len = (length + (~finished).long()).view(b, g, k, 1)  # one length per row, whatever the next token
        rows, new_lp, new_rank, new_len, new_tok = [], [], [], [], []
        for pool in sources:  # each target group's new k beams
            c = _side_by_side(cand, pool)
            c_rank = c if bonus is None else _side_by_side(cand_rank, pool)
            c_len = torch.cat([cand_len[:, src] for src, _ in pool], 1)  # (B, len(pool)*k, 1)
            top = _penalised(c_rank, c_len, alpha).reshape(b, -1).topk(k, dim=-1).indices  # (B, k)
            slot, token = top // v, top % v
            src_group = torch.tensor([src for src, _ in pool], device=device)[slot // k]  # (B, k)
            rows.append((torch.arange(b, device=device)[:, None] * g + src_group) * k + slot % k)
            new_lp.append(c.reshape(b, -1).gather(1, top))
            if bonus is not None:
                new_rank.append(c_rank.reshape(b, -1).gather(1, top))
            new_len.append(c_len.view(b, -1).gather(1, slot))
            new_tok.append(token)
        rows_t = torch.stack(rows, 1).view(-1)  # (B*g*k,) source hypothesis of each new beam
        logprob = torch.stack(new_lp, 1)  # (B, g, k)
        rank = logprob if bonus is None else torch.stack(new_rank, 1)
        length = torch.stack(new_len, 1).view(-1)
        token = torch.stack(new_tok, 1).view(-1)
        finished = finished[rows_t] | (token == specials.end)
        history = torch.cat([history[rows_t], token[:, None]], dim=1)
        state = tuple(s.index_select(1, rows_t) for s in state)
        prev = token
        if finished.all():
            break
    flat_lp = logprob.view(-1)
    hyps = _finish(history, flat_lp, _penalised(rank.reshape(-1), length, alpha), specials)
    out = []
    for i in range(b):
        groups = [[h for h in hyps[(i * g + j) * k:(i * g + j + 1) * k] if h.logprob > float("-inf")] for j in range(g)]
        best = next((grp for grp in reversed(groups) if grp), [])
        out.append(sorted(best, key=lambda h: -h.score)[: config.num_return])
    return out


def _unused(bonus: torch.Tensor, history: torch.Tensor, shape: tuple[int, int, int, int],
            partner: torch.Tensor | None = None) -> torch.Tensor:
    """(1 or B, 1, 1, V) bonus -> (B, g, k, V) = ``shape``: each hypothesis's bonus, 0 for the words it holds.

    Why once per word: the bonus rewards a caption for naming something specific; paid again on every use,
    it pays the beam to repeat a rare word ("murky murky water", "grocery grocery bags"), which the training
    captions all but never do (7 adjacent repeats in 30,000)."""
    out = bonus.new_empty(shape).copy_(bonus.expand(shape))  # a fresh tensor the caller may add into
    if history.shape[1]:
        out.view(-1, shape[-1]).scatter_(1, history, 0.0)
        if partner is not None:  # "dogs" after "dog" earns nothing either
            out.view(-1, shape[-1]).scatter_(1, partner[history], 0.0)
    return out


def _side_by_side(cand: torch.Tensor, pool: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
    """(B, g, k, V) candidates -> (B, len(pool)*k, V): a target group's candidates, one block per (source group,
    allowed tokens) pair of its pool, disallowed tokens at -inf (``allowed`` None: every token, no copy to mask)."""
    blocks = [cand[:, src] if allowed is None else cand[:, src].masked_fill(~allowed[:, None, :], float("-inf"))
              for src, allowed in pool]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)


def _group_sources(constraints: list[list[int]] | None, b: int, v: int,
                   device: torch.device) -> list[list[tuple[int, torch.Tensor | None]]]:
    """Per target group, where its candidates come from: (source group, (B, V) mask of allowed next tokens, None
    for any token). Plain search: group 0 from itself, any token. Constrained: group 0 from itself without
    constraint words; group 1 from itself (any token) and from group 0 by a constraint word."""
    if constraints is None:
        return [[(0, None)]]
    hit = torch.zeros(b, v, dtype=torch.bool, device=device)  # (B, V): the image's constraint words
    for i, ids in enumerate(constraints):
        hit[i, ids] = True
    return [[(0, ~hit)], [(1, None), (0, hit)]]
