"""``captioner train --init-from``: start from a trained checkpoint, its vocabulary extended with the new data's words.

Why: a few hundred captioned images of a new domain cannot train a decoder from scratch, but they can
teach a trained one the domain's words when each word has a few dozen uses (benchmarks/finetune_domain.py:
201 named icons taught the bundled model 26 words, held-out CIDEr-D 0.9 -> 54.2; Flickr8k words with about
five uses each were not learned). The run's vocabulary is the checkpoint's, in its order (every
old id keeps its word, so every learned row stays valid), followed by the words of the data directory's
``vocab.json`` the checkpoint lacks; that vocabulary is built from the data's training split with
``captioner prepare --min-count``, so a new word needs that many training uses, as any word does.

Why new rows start as copies of ``<unk>``'s: in the checkpoint's own training data every word outside
its vocabulary was ``<unk>``, so ``<unk>``'s embedding and output rows are what the model learned for
"a rarer word here". The new words share ``<unk>``'s probability by their training counts (output bias
``b_unk + log(count / total count of the new words)``), so at the start they add together exactly
``<unk>``'s mass and the model ranks the old words as the checkpoint did; fine-tuning then tells them
apart. Every old row is the checkpoint's, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import VOCAB, Loaded
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, VocabError
from .model import CaptionDecoder
from .vocab import Vocab


def start_vocab(checkpoint: Path, data_vocab: Vocab) -> Vocab:
    """The run's vocabulary: ``checkpoint``'s words, then ``data_vocab``'s words it lacks."""
    if not Path(checkpoint).is_dir():
        raise CheckpointError(f"--init-from {checkpoint}: checkpoint directory not found")
    try:
        return Vocab.load(Path(checkpoint) / VOCAB).extended(data_vocab)
    except VocabError as err:
        raise CheckpointError(str(err)) from None


def check_given(loaded: Loaded, given: dict[str, object]) -> None:
    """Refuse architecture or encoder settings that differ from the checkpoint's: the model is the checkpoint's,
    so another value could only be ignored. ``given`` maps ``ModelConfig`` fields, and ``encoder`` (the name),
    ``weights`` and ``image_size`` of its encoder, to the values asked for."""
    config = loaded.config
    own = {**config.to_json(), "encoder": config.encoder.name, "weights": config.encoder.weights,
           "image_size": config.encoder.image_size}
    wrong = [f"{name} {value!r} (the checkpoint's: {own[name]!r})" for name, value in given.items() if own[name] != value]
    if wrong:
        raise ConfigError(f"--init-from {loaded.directory}: the model and its encoder come from the checkpoint; "
                          f"{', '.join(wrong)} cannot be set")


def init_decoder(loaded: Loaded, vocab: Vocab) -> tuple[ModelConfig, CaptionDecoder]:
    """The checkpoint's decoder with one embedding and output row per word of ``vocab`` beyond its own."""
    config = loaded.config
    if config.members != 1:
        raise ConfigError(f"--init-from {loaded.directory}: an ensemble of {config.members} decoders; "
                          "start from one member's checkpoint (a run's best/)")
    old = loaded.vocab
    if vocab.words[: len(old)] != old.words:
        raise ConfigError(f"--init-from {loaded.directory}: the run's vocabulary does not start with the checkpoint's")
    new_config = ModelConfig.from_json({**config.to_json(), "vocab_size": len(vocab)})
    decoder = CaptionDecoder(new_config)
    state = dict(loaded.decoder_state)
    new_words = vocab.words[len(old):]
    if new_words:
        counts = torch.tensor([max(1, vocab.counts.get(w, 0)) for w in new_words], dtype=torch.float32)  # (K,)
        share = torch.log(counts / counts.sum())  # (K,) each new word's part of <unk>'s probability
        unk, k = old.specials.unk, len(new_words)
        state["embed.weight"] = torch.cat([state["embed.weight"], state["embed.weight"][unk].expand(k, -1)])  # (V', E)
        state["out.weight"] = torch.cat([state["out.weight"], state["out.weight"][unk].expand(k, -1)])  # (V', H)
        state["out.bias"] = torch.cat([state["out.bias"], state["out.bias"][unk] + share])  # (V',)
    decoder.load_state_dict(state)
    return new_config, decoder
