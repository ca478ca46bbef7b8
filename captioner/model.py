"""Step 3 of the data flow: image feature -> initial recurrent state -> next-word logits.

Bridge: feature -> dropout -> Linear -> tanh -> (h0[, c0]) for every decoder layer (the product's
design: the image enters through the initial state). Decoder: embedding -> torch.nn LSTM/GRU/RNN
(cuDNN on GPU) -> dropout -> Linear to the vocabulary. The same ``init_state``/``step`` pair drives
teacher-forced training and every decoding strategy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

State = tuple[torch.Tensor, ...]  # each (layers, B, hidden): (h,) for gru/rnn, (h, c) for lstm


class CaptionDecoder(nn.Module):
    """Everything after the CNN: bridge, recurrent decoder and vocabulary projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n_states = 2 if config.cell == "lstm" else 1
        self.bridge = nn.Sequential(nn.Dropout(config.dropout),
                                    nn.Linear(config.feature_dim, n_states * config.layers * config.hidden))
        self.image_embed = nn.Linear(config.feature_dim, config.embed) if config.feed_image else None
        self.embed = nn.Embedding(config.vocab_size, config.embed, padding_idx=0)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
        self.rnn = rnn_cls(config.embed, config.hidden, num_layers=config.layers, batch_first=True,
                           dropout=config.dropout if config.layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.hidden, config.vocab_size)
        if config.cell == "lstm":
            self._open_forget_gates()

    def _open_forget_gates(self) -> None:
        """Forget-gate bias 1 (Jozefowicz et al., 2015): the cell path starts by remembering, so the
        gradient reaches early steps (``captioner gradflow`` measures the difference)."""
        with torch.no_grad():
            for name, bias in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    h = self.config.hidden
                    bias[h:2 * h].fill_(1.0)  # PyTorch gate order: input, forget, cell, output

    def init_state(self, features: torch.Tensor) -> State:
        """(B, D) image features -> initial state tuple, each (layers, B, hidden)."""
        b, cfg = features.shape[0], self.config
        flat = torch.tanh(self.bridge(features))  # (B, S*L*H)
        parts = flat.view(b, -1, cfg.layers, cfg.hidden).permute(1, 2, 0, 3).contiguous()  # (S, L, B, H)
        state = tuple(parts.unbind(0))
        if self.image_embed is not None:
            _, state = self._run(self.image_embed(features).unsqueeze(1), state)  # (B, 1, E) first step
        return state

    def _run(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.config.cell == "lstm":
            out, (h, c) = self.rnn(inputs, state)
            return out, (h, c)
        out, h = self.rnn(inputs, state[0])
        return out, (h,)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing on (B, D) features and (B, T) ``<start> w1 .. wn <end> <pad>..`` tokens.

        Returns logits (n_real, V) and targets (n_real,) for the positions whose target is a real
        token: only those are projected to the vocabulary (the projection dominates the cost), and
        ``<pad>`` never reaches the loss or the gradient.
        """
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        out, _ = self._run(self.embed(inputs), self.init_state(features))  # (B, T-1, H)
        mask = targets != pad_id  # (B, T-1)
        return self.out(self.drop(out[mask])), targets[mask]  # (n_real, V), (n_real,)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoding step: (N,) previous tokens -> (N, V) logits and the next state.

        Runs ``self.rnn``'s own weights through the fused single-step cell functions: for one time
        step they are several times faster on CPU than ``nn.LSTM``'s oneDNN sequence path, and give
        the same numbers.
        """
        x, cfg = self.embed(tokens), self.config  # (N, E)
        hs, cs = [], []
        for layer in range(cfg.layers):
            weights = [getattr(self.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if layer:
                x = nn.functional.dropout(x, cfg.dropout, self.training)
            if cfg.cell == "lstm":
                h, c = torch.lstm_cell(x, (state[0][layer], state[1][layer]), *weights)
                cs.append(c)
            elif cfg.cell == "gru":
                h = torch.gru_cell(x, state[0][layer], *weights)
            else:
                h = torch.rnn_tanh_cell(x, state[0][layer], *weights)
            hs.append(h)
            x = h
        new_state = (torch.stack(hs), torch.stack(cs)) if cfg.cell == "lstm" else (torch.stack(hs),)
        return self.out(x), new_state

class EnsembleDecoder(nn.Module):
    """Decoders of one architecture (e.g. trained with different seeds) decoding together.

    Why: averaging the members' next-word probabilities is the cheapest reliable gain in caption
    quality; it plugs into every decoding strategy because it offers the same ``init_state``/``step``.
    The state is the members' state tuples concatenated; ``step`` returns log of the mean probability.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(CaptionDecoder(config) for _ in range(config.members))
        self.n_states = 2 if config.cell == "lstm" else 1

    def init_state(self, features: torch.Tensor) -> State:
        return tuple(s for m in self.members for s in m.init_state(features))

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        k, logps, new_state = self.n_states, [], []
        for i, member in enumerate(self.members):
            logits, s = member.step(tokens, state[i * k:(i + 1) * k])
            logps.append(torch.log_softmax(logits.float(), dim=-1))
            new_state.extend(s)
        return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(self.members)), tuple(new_state)


def build_decoder(config: ModelConfig) -> CaptionDecoder | EnsembleDecoder:
    """The decoder a checkpoint's config describes: one decoder, or an ensemble of ``members``."""
    return CaptionDecoder(config) if config.members == 1 else EnsembleDecoder(config)


def caption_loss(decoder: nn.Module, features: torch.Tensor, tokens: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over real target tokens; returns the loss and the number of tokens."""
    logits, targets = decoder(features, tokens)
    return nn.functional.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing), targets.numel()
