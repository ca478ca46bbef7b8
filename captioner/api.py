"""The Python API: ``Captioner.from_pretrained(...).caption(images)``.

This is the one place where the steps meet — image -> pixels -> features -> tokens -> text — and the
batch command, the evaluation command and the Gradio app all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint
from .confidence import Calibration, add_confidence, fill_match, tag_probs
from .consensus import ConsensusIndex
from .matching import Matcher, pick_levels
from .config import ModelConfig
from .decoding import DecodeConfig, Hypothesis, decode, finish_static, greedy_static
from .encoder import Encoder
from .errors import CheckpointError, ConfigError, VocabError
from .explain import Explanation, GradCam, explain_image
from .features import ImageFiles, collate_images
from .fetch import FetchConfig
from .graphs import GraphedCall
from .guidance import IMAGENET_CATEGORIES, Tagger
from .images import ImageSource, load_image
from .model import RUNTIMES, CaptionDecoder, EnsembleDecoder, build_decoder
from .options import check_names
from .runtime import autocast, loader_workers, resolve_device, resolve_precision
from .tokenizer import detokenize
from .vocab import GENDERED_WORDS, Vocab

BUNDLED = "flickr8k-mobilenet_v2-lstm"
MODELS = {"fast": BUNDLED}  # names for ``from_pretrained``, ``--checkpoint`` and the app's picker
PACKAGE_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # pip install .: the wheel ships them here
REPO_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"  # a source tree or pip install -e .
#: rows up to which the encoder runs from a CUDA graph (``captioner/graphs.py``): requests of a few photos,
#: whose time is mostly kernel launches; larger batches keep the GPU busy without one and would only hold
#: the graph's activation memory.
ENCODER_GRAPH_ROWS = 8
#: rows up to which greedy decoding runs from a CUDA graph: ``stream`` decodes its pooled batches at once.
DECODER_GRAPH_ROWS = 1024


def bundled_checkpoints() -> Path:
    """The directory of the shipped checkpoints: the repository's ``checkpoints/`` is packaged as
    ``captioner/checkpoints/`` (pyproject.toml), so an installed package has it inside; a source tree
    or an editable install uses the repository's own."""
    return PACKAGE_CHECKPOINTS if PACKAGE_CHECKPOINTS.is_dir() else REPO_CHECKPOINTS


def default_checkpoint() -> Path:
    """``$CAPTIONER_CHECKPOINT`` if set, else the bundled model."""
    return Path(os.environ.get("CAPTIONER_CHECKPOINT", bundled_checkpoints() / BUNDLED))


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """A bundled model's name (``fast``, ...) or a checkpoint directory -> the directory; None -> the default."""
    if name_or_path is None:
        return default_checkpoint()
    path = Path(name_or_path)
    if str(name_or_path) in MODELS and not path.exists():
        return bundled_checkpoints() / MODELS[str(name_or_path)]
    if not path.exists() and not {"/", os.sep} & set(str(name_or_path)):  # a bare word: a misspelt model name?
        raise CheckpointError(f"{name_or_path}: neither a checkpoint directory nor a bundled model's name "
                              f"({', '.join(MODELS)})")
    return path


@dataclass
class ImageResult:
    """Captions of one image, best first; ``error`` is set instead when the image was unusable."""

    source: str
    nbest: list[dict]
    error: str | None = None

    @property
    def caption(self) -> str | None:
        return self.nbest[0]["caption"] if self.nbest else None


class Captioner:
    """A loaded model: encoder + decoder + vocabulary + preprocessing, on one device."""

    def __init__(self, encoder: Encoder, decoder: CaptionDecoder | EnsembleDecoder, vocab: Vocab, config: ModelConfig,
                 device: str = "auto", precision: str = "auto", calibration: Calibration | None = None,
                 decoding: dict | None = None, consensus: ConsensusIndex | None = None,
                 matcher: Matcher | None = None) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.encoder = encoder.for_inference(self.device)
        self.decoder = decoder.to(self.device).eval()
        self.vocab, self.config = vocab, config
        self.calibration = calibration  # None: captions carry no "confidence" (captioner/confidence.py)
        self.decoding = dict(decoding or {})  # the checkpoint's recommended decoding options (captioner/tuning.py)
        self.consensus = consensus  # training photos' captions for consensus reranking (captioner/consensus.py)
        self.matcher = matcher  # image-caption matching model for matching reranking (captioner/matching.py)
        if matcher is not None:
            matcher.model.to(self.device)
        self.preprocess = config.encoder.preprocess
        self.fetch = FetchConfig()  # how image URLs are fetched; private addresses need FetchConfig(allow_private=True)
        # On a GPU uint8 pixels cross to the device, which normalises them (``Preprocess.to_uint8``). With
        # ``graphs`` the encoder on few images and greedy decoding replay CUDA graphs (``captioner/graphs.py``):
        # opt-in until a lent GPU has measured it (benchmarks/README.md). Plain attributes, so that a caller
        # (or a test on a CPU, where the graphs run uncaptured) can switch them.
        self.device_pixels = self.device.type == "cuda"
        self.graphs = False
        self._moments = self.preprocess.moments(self.device)
        self._graphed: dict[tuple, GraphedCall] = {}
        self._non_final: dict[float, torch.Tensor | None] = {}  # ``non_final`` per min_end_rate

    @property
    def cpu_runtime(self) -> str:
        """Who runs the LSTM decoder's inference step on a CPU: ``auto`` (the default: ``fbgemm`` when the
        weights are stored in float16, as in every exported checkpoint, else ONNX Runtime when installed, else
        torch), ``fbgemm``, ``onnxruntime`` or ``torch`` (``CaptionDecoder.step``; the same captions every way)."""
        return self._decoders()[0].cpu_runtime

    @cpu_runtime.setter
    def cpu_runtime(self, runtime: str) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"cpu_runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        for decoder in self._decoders():
            decoder.cpu_runtime = runtime

    def _decoders(self) -> list[CaptionDecoder]:
        return list(getattr(self.decoder, "members", [self.decoder]))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str = "auto",
                        precision: str = "auto", calibrated: bool = True) -> "Captioner":
        """Load a checkpoint directory (a run's ``best/``), a bundled model by name (``MODELS``), or the
        default bundled model when ``path`` is None; ``calibrated=False`` ignores its ``calibration.json``."""
        loaded = load_checkpoint(resolve_model(path), calibrated)
        decoder = build_decoder(loaded.config)
        try:
            decoder.load_state_dict(loaded.decoder_state)
        except RuntimeError as err:
            raise CheckpointError(f"{loaded.directory}/model.safetensors: decoder tensors do not match "
                                  f"config.json: {str(err)[:300]}") from None
        return cls(loaded.encoder, decoder, loaded.vocab, loaded.config, device, precision, loaded.calibration,
                   loaded.decoding, loaded.consensus, loaded.matcher)

    def decode_config(self, **options) -> DecodeConfig:
        """Decoding options over this model's defaults: its caption length as ``max_len`` and, unless
        ``options`` name another strategy, the decoding its checkpoint recommends (``decoding.json``, chosen on
        validation by ``captioner tune-decoding``). Another strategy starts from ``DecodeConfig``'s own
        defaults, so ``strategy="greedy"`` is plain greedy whatever beam settings the model prefers. A fixed
        ``specificity`` given replaces recommended ``specificity_levels`` and the other way round."""
        check_names(DecodeConfig, options)
        recommended = self.decoding.get("strategy", DecodeConfig.strategy)
        defaults = dict(self.decoding) if options.get("strategy", recommended) == recommended else {}
        if "specificity" in options or options.get("consensus"):
            defaults.pop("specificity_levels", None)
        if options.get("specificity_levels"):
            defaults.pop("specificity", None)
        return DecodeConfig(**{"max_len": self.config.max_len, **defaults, **options})

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D) float32 features; uint8 pixels (``Preprocess.to_uint8``)
        are normalised on the device."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.graphs:
            return self._graph(("encoder",), self._encode, ENCODER_GRAPH_ROWS)(pixels)[0]
        return self._encode(pixels)[0]

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        with autocast(self.precision, self.device, cache=False):
            if pixels.dtype == torch.uint8:
                pixels = self.preprocess.normalise_batch(pixels, self._moments)
            return (self.encoder.encode(pixels).float(),)

    def _graph(self, key: tuple, fn, max_rows: int) -> GraphedCall:
        if key not in self._graphed:
            self._graphed[key] = GraphedCall(fn, max_rows)
        return self._graphed[key]

    def _greedy(self, features: torch.Tensor, config: DecodeConfig) -> list[list[Hypothesis]]:
        """Greedy decoding from one CUDA graph per setting of what it records (``decoding.greedy_static``)."""
        recorded = DecodeConfig(max_len=config.max_len, suppress_unk=config.suppress_unk,
                                no_repeat_ngram=config.no_repeat_ngram, neutral=config.neutral,
                                min_end_rate=config.min_end_rate)
        specials, banned, non_final = self.vocab.specials, self.gendered, self.non_final(config.min_end_rate)

        def run(feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with autocast(self.precision, self.device, cache=False):
                return greedy_static(self.decoder, feats, recorded, specials, banned, non_final)

        key = ("greedy", recorded.max_len, recorded.suppress_unk, recorded.no_repeat_ngram, recorded.neutral,
               recorded.min_end_rate)
        return finish_static(*self._graph(key, run, DECODER_GRAPH_ROWS)(features), config, specials)

    @property
    def can_tag(self) -> bool:
        """Whether the encoder kept an ImageNet-1k head (tags and guided decoding need it)."""
        head = self.encoder.head
        return head is not None and list(head.parameters())[-1].shape[0] == len(IMAGENET_CATEGORIES)

    @functools.cached_property
    def tagger(self) -> Tagger:
        """The encoder's ImageNet head as caption-word probabilities (built on first use)."""
        return Tagger(self.encoder, self.vocab.words, self.vocab.counts, IMAGENET_CATEGORIES)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, config: DecodeConfig, confidence: bool = True) -> list[list[dict]]:
        """(B, D) features -> per image, the n-best as ``{"caption", "tokens", "logprob", "score"}``, plus
        ``"confidence"`` (probability the caption is good) when the checkpoint has a ``calibration.json`` and
        ``confidence`` is true (a caller that only wants the text skips its cost: the tagger's and the matching
        model's forward passes, ~2.5 ms of a ~28 ms greedy request on the 2-core CPU)."""
        features = features.to(self.device)
        constraints = None
        if config.guide:
            constraints = self.tagger.constraints(features, config.guide_threshold, self.vocab.index)
        if config.consensus and self.consensus is None:
            raise ConfigError("consensus reranking needs the checkpoint's consensus index: build it from your "
                              "training data with `captioner consensus-index DATA --checkpoint CHECKPOINT`")
        if (config.match_weight or config.specificity_levels) and self.matcher is None:
            raise ConfigError(f"{'specificity by fit' if config.specificity_levels else 'matching reranking'} needs "
                              "the checkpoint's matching model: train it with `captioner matching DATA --checkpoint "
                              "CHECKPOINT`")
        rerank = config.consensus or config.match_weight or config.specificity_levels
        if config.strategy == "greedy" and self.graphs:
            hyps = self._greedy(features, config)
        else:
            search = dataclasses.replace(config, num_return=config.beam_size) if rerank else config
            rarity = self.rarity if config.specificity or config.specificity_levels else None
            tag_bonus = self.tagger.word_bonus(features, config.tag_bonus) if config.tag_bonus else None
            with autocast(self.precision, self.device):
                hyps = decode(self.decoder, features, search, self.vocab.specials, constraints, rarity, self.gendered,
                              self.non_final(config.min_end_rate), tag_bonus,
                              self.tagger.number_partner.to(self.device) if config.tag_bonus else None)
        nbest = [[self._describe(h) for h in per_image] for per_image in hyps]
        if config.consensus:
            nbest = self.consensus.rerank(nbest, features, config.consensus, config.consensus_weight)
        elif config.specificity_levels:  # one row per (level, image): each level reranked, then a level per image
            b = len(features)
            nbest = self.matcher.rerank(nbest, features.repeat(len(config.specificity_levels), 1), self.vocab,
                                        config.match_weight)
            nbest = pick_levels([nbest[i:i + b] for i in range(0, len(nbest), b)], config.specificity_levels,
                                config.specificity_cost)
        elif config.match_weight:
            nbest = self.matcher.rerank(nbest, features, self.vocab, config.match_weight)
        nbest = [n[:config.num_return] for n in nbest] if rerank else nbest
        if self.calibration is not None and confidence:
            tag_prob = None
            if "tag_prob" in self.calibration.features:
                tag_prob = tag_probs(self.tagger, features)
            if "match" in self.calibration.features:
                fill_match(self.matcher, nbest, features, self.vocab)
            add_confidence(self.calibration, nbest, tag_prob)
        return nbest

    @torch.inference_mode()
    def tags(self, images: ImageSource | Sequence[ImageSource], threshold: float = 0.05, top: int = 5):
        """What the encoder's ImageNet head recognises, as caption words: per image a list of
        ``{"word", "prob", "imagenet_class"}``, best first (one image gives one list)."""
        single = not isinstance(images, (list, tuple))
        if not single and not images:
            return []
        found = [[asdict(t) for t in per] for per in self.tagger.tags(self.features([images] if single else images),
                                                                       threshold, top)]
        return found[0] if single else found

    @functools.cached_property
    def gendered(self) -> torch.Tensor:
        """Ids of the vocabulary's ``GENDERED_WORDS`` on the model's device, which ``neutral`` decoding bans (decoding
        reads them only then)."""
        return torch.tensor(self.vocab.ids(GENDERED_WORDS), dtype=torch.long, device=self.device)

    def non_final(self, min_end_rate: float) -> torch.Tensor | None:
        """(V,) bool on the model's device: the words no caption may end on at ``min_end_rate``
        (``Vocab.non_final``); None when that is none (0, or a vocabulary without end counts)."""
        if min_end_rate not in self._non_final:
            ids = self.vocab.non_final(min_end_rate) if min_end_rate else []
            mask = torch.zeros(len(self.vocab), dtype=torch.bool, device=self.device)
            mask[ids] = True
            self._non_final[min_end_rate] = mask if ids else None
        return self._non_final[min_end_rate]

    @functools.cached_property
    def rarity(self) -> torch.Tensor:
        """(V,) ``Vocab.rarity`` on the model's device, for ``specificity``."""
        try:
            return torch.tensor(self.vocab.rarity(), device=self.device)
        except VocabError as err:
            raise ConfigError(f"specificity: {err}") from None

    @functools.cached_property
    def gradcam(self) -> GradCam:
        """The encoder's last convolutional block and Grad-CAM over it (traced on first use)."""
        return GradCam(self.encoder)

    def explain(self, image: ImageSource, **options) -> Explanation:
        """Caption one image (its best caption under ``options``, the same as ``caption`` gives) with a
        saliency map per word: ``.words``, ``.maps`` (n, H, W) in [0, 1] on ``.image``, ``.caption``
        (Grad-CAM; ``captioner/explain.py``)."""
        return explain_image(self, image, self.decode_config(**options))

    def _describe(self, h: Hypothesis) -> dict:
        words = self.vocab.decode(h.tokens)
        return {"caption": detokenize(words), "tokens": words, "logprob": round(h.logprob, 4), "score": round(h.score, 4)}

    def caption(self, images: ImageSource | Sequence[ImageSource], **options):
        """Caption one image or a list of them (paths, http(s) URLs fetched under ``self.fetch``, image file
        bytes, PIL images, numpy arrays; an empty list gives an empty list).

        Per image the result is the caption string when ``num_return`` is 1, else the n-best list of
        ``{"caption", "logprob", "score", "tokens"}`` dicts. A single image gives that result, a list
        gives a list of them. An unusable image raises ``ImageLoadError`` naming it.
        """
        single = not isinstance(images, (list, tuple))
        config = self.decode_config(**options)
        nbest = self.nbest([images] if single else list(images), config, confidence=config.num_return > 1)
        results = [n[0]["caption"] if config.num_return == 1 else n for n in nbest]
        return results[0] if single else results

    def nbest(self, images: Sequence[ImageSource], config: DecodeConfig, confidence: bool = True) -> list[list[dict]]:
        """Per image, the n-best ``{"caption", "tokens", "logprob", "score"}`` dicts, best first (none for none);
        with ``"confidence"`` as ``generate`` gives it."""
        return self.generate(self.features(images), config, confidence) if len(images) else []

    def features(self, images: Sequence[ImageSource], fetch: FetchConfig | None = None) -> torch.Tensor:
        """Images -> (B, D) encoder features: the one load + preprocess + encode of in-memory requests.
        URLs are fetched under ``fetch`` (default ``self.fetch``; the app passes its own, never private)."""
        pre, fetch = self.preprocess, fetch or self.fetch
        convert = pre.to_uint8 if self.device_pixels else pre
        pixels = torch.stack([convert(load_image(src, pre.min_side, fetch)) for src in images])  # (B, 3, H, W)
        return self.encode(pixels)

    def stream(self, paths: Sequence[str], config: DecodeConfig, batch_size: int = 32, workers: int = 2,
               decode_batch: int = 256) -> Iterator[ImageResult]:
        """Caption image files in order: JPEG decoding in worker processes, the encoder in batches of
        ``batch_size``, the decoder over the features of ``decode_batch`` images at a time.

        Why two batch sizes: one decoder step is a few small matrix products whose cost on a CPU is
        mostly fixed per call (32 rows: ~40 GFLOP/s, 256 rows: ~90 on 2 cores), so pooling the
        features of several encoder batches halves the decoder's share of the time; the encoder gains
        nothing from larger batches and would only need more memory.
        On a CPU, ``workers`` is capped by the cores torch's threads leave free (``loader_workers``). On a GPU
        the workers hand over uint8 pixels, pinned, that the device normalises (``device_pixels``).
        Unusable files come back as results with ``error`` set; the rest goes on.
        """
        workers = loader_workers(workers, self.device)
        loader = DataLoader(ImageFiles(list(paths), self.preprocess, fetch=self.fetch, uint8=self.device_pixels),
                            batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_images, pin_memory=self.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        done: dict[int, ImageResult] = {}  # results of the pooled batches, decoded or failed
        pooled: list[tuple[list[int], torch.Tensor]] = []

        def flush() -> Iterator[ImageResult]:
            if pooled:
                ids = [i for idx, _ in pooled for i in idx]
                for i, nbest in zip(ids, self.generate(torch.cat([f for _, f in pooled]), config)):
                    done[i] = ImageResult(str(paths[i]), nbest)
                pooled.clear()
            yield from (done[i] for i in sorted(done))
            done.clear()

        for idx, pixels, errors in loader:
            done.update({i: ImageResult(str(paths[i]), [], err.removeprefix(f"{paths[i]}: ")) for i, err in errors})
            if pixels is not None:
                pooled.append((idx, self.encode(pixels)))
            if sum(len(idx) for idx, _ in pooled) >= decode_batch:
                yield from flush()
        yield from flush()
