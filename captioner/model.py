"""Step 3 of the data flow: image feature -> initial recurrent state -> next-word logits.

Bridge: feature -> dropout -> Linear -> tanh -> (h0[, c0]) for every decoder layer (the product's
design: the image enters through the initial state). Decoder: embedding -> torch.nn LSTM/GRU/RNN
(cuDNN on GPU) -> dropout -> Linear to the vocabulary. The same ``init_state``/``step`` pair drives
teacher-forced training and every decoding strategy.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .config import ModelConfig
from . import fp16_step
from .onnx_step import OnnxStep, available as onnx_available

State = tuple[torch.Tensor, ...]  # each (layers, B, hidden): (h,) for gru/rnn, (h, c) for lstm
# ``CaptionDecoder.cpu_runtime``: who runs an LSTM's inference step on a CPU. auto = fbgemm when the weights are
# exact in float16 (every exported checkpoint), else onnxruntime when installed, else torch
RUNTIMES = ("auto", "fbgemm", "onnxruntime", "torch")


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
        # who runs an LSTM's inference step on a CPU (``RUNTIMES``): "fbgemm" (``captioner/fp16_step.py``: float16
        # weights, float32 arithmetic), "onnxruntime" (``captioner/onnx_step.py``: both cores), "torch", or "auto"
        self.cpu_runtime = RUNTIMES[0]
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

    #: rows up to which ``step`` takes the small-batch torch CPU path (``_step_small``) when ONNX Runtime does
    #: not run the step: one thread, and for an LSTM at inference one matrix product over pre-transposed,
    #: concatenated input and recurrent weights.
    #: Why one thread: at few rows the products are matrix-vector products that MKL runs on one thread
    #: anyway, but the cell's ``tanh`` (MKL VML) opens a parallel region per call, and on a busy machine
    #: waiting for the second thread costs a scheduler time slice: on the shared 2-core CPU one step at 1
    #: row took 9.7 ms with 2 threads, 1.8 ms with 1 (tanh 25 ms of each 39 ms ``lstm_cell``,
    #: torch.profiler); one thread was faster at every size up to 64 rows. Why pre-transposed: MKL's
    #: matrix-vector product reads a (K, N) weight faster than the (N, K) one ``nn.Linear`` stores, and two
    #: products become one: a step at 1 row 1.40 -> 1.02 ms, at 3 rows (beam 3) 3.7 -> 2.7, at 32 rows
    #: 7.1 -> 6.8, for 31 MB more memory (the bundled model's copies, made at the first such step).
    ONE_THREAD_ROWS = 32

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoding step: (N,) previous tokens -> (N, V) logits and the next state.

        Runs ``self.rnn``'s own weights through the fused single-step cell functions: for one time
        step they are several times faster on CPU than ``nn.LSTM``'s oneDNN sequence path, and give
        the same numbers. An LSTM at inference on a CPU runs on the runtime ``cpu_runtime`` names
        (``_cpu_runtime``): FBGEMM's float16-weight products (``captioner/fp16_step.py``: half the bytes per
        word), ONNX Runtime (``captioner/onnx_step.py``: both cores), or torch's one-thread path up to
        ``ONE_THREAD_ROWS`` rows (``_step_small``). All give the same numbers up to float rounding (captions of
        Flickr8k test photos compared in benchmarks/README.md; tests/test_decoder_small_batch.py).
        """
        if tokens.device.type == "cpu" and (key := self._weights_key()) is not None:
            runtime = self._cpu_runtime(key)
            if runtime == "fbgemm":
                logits, h, c = self._fp16_step(key)(tokens, state[0], state[1])
                return logits, (h, c)
            if runtime == "onnxruntime":
                logits, h, c = self._onnx_step(key, torch.get_num_threads())(tokens, state[0], state[1])
                return logits, (h, c)
            if tokens.shape[0] <= self.ONE_THREAD_ROWS:
                with _one_cpu_thread():
                    return self._step_small(tokens, state, self._prepared(key))
        return self._step(tokens, state)

    def _weights_key(self) -> list | None:
        """For an LSTM at inference: the identity and version of every weight the step reads, which keys the
        runtimes' copies of them. None when the step must run through autograd or the weights cannot be
        versioned."""
        if self.config.cell != "lstm" or self.training or torch.is_grad_enabled():
            return None
        params = [p for layer in range(self.config.layers) for p in self._layer_weights(layer)] + [
            self.out.weight, self.out.bias, self.embed.weight]
        try:  # any in-place update bumps _version
            return [(p.data_ptr(), p.dtype, p._version) for p in params]
        except RuntimeError:  # weights created under inference_mode keep no version counter
            return None

    def _cpu_runtime(self, key: list) -> str:
        """Which runtime ``cpu_runtime`` resolves to for these weights; a named runtime that cannot run them is
        an error that says why, "auto" falls through fbgemm -> onnxruntime -> torch."""
        runtime = self.cpu_runtime
        if runtime not in RUNTIMES:
            raise ValueError(f"cpu_runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if runtime in ("auto", "fbgemm"):
            if self._fp16_step(key) is not None:
                return "fbgemm"
            if runtime == "fbgemm":
                raise ValueError("cpu_runtime 'fbgemm' runs weights stored in float16 (as `captioner export` writes "
                                 "them) and these are not: export the checkpoint, or use 'onnxruntime' or 'torch'"
                                 if fp16_step.available() else "cpu_runtime 'fbgemm': this torch build has no FBGEMM")
        if runtime in ("auto", "onnxruntime"):
            if onnx_available():
                return "onnxruntime"
            if runtime == "onnxruntime":
                raise ImportError("cpu_runtime 'onnxruntime' needs `pip install onnxruntime onnx`")
        return "torch"

    def _prepared(self, key: list) -> tuple[list, torch.Tensor]:
        """``(layers, out_t)`` for the float32 runtimes: each layer's ``(W, b)``, ``W`` (E+H, 4H) the
        pre-transposed concatenation of ``weight_ih`` and ``weight_hh``, and ``out_t`` the transposed
        vocabulary projection; kept until the weights change (``key``)."""
        if getattr(self, "_small_cache", (None,))[0] != key:
            layers = [(torch.cat([w_ih, w_hh], 1).t().contiguous(), (b_ih + b_hh).contiguous())
                      for w_ih, w_hh, b_ih, b_hh in map(self._layer_weights, range(self.config.layers))]
            self._small_cache = (key, layers, self.out.weight.t().contiguous())
        return self._small_cache[1:]

    def _step_small(self, tokens: torch.Tensor, state: State, prepared: tuple) -> tuple[torch.Tensor, State]:
        """``_step`` as ``gates = [x, h] @ W + b`` over ``_prepared``'s weights, then PyTorch's gate order
        (input, forget, cell, output)."""
        layers, out_t = prepared
        x, hs, cs = self.embed(tokens), [], []  # (N, E)
        for layer, (w, b) in enumerate(layers):
            gates = torch.addmm(b, torch.cat([x, state[0][layer]], 1), w)  # (N, 4H)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * state[1][layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)  # (N, H)
            hs.append(x)
            cs.append(c)
        return torch.addmm(self.out.bias, x, out_t), (torch.stack(hs), torch.stack(cs))

    def _fp16_step(self, key: list) -> fp16_step.Fp16Step | None:
        """FBGEMM's step over these weights, or None when this torch has no FBGEMM or float16 would change a
        weight matrix (biases stay float32); kept until the weights change."""
        if getattr(self, "_fp16_cache", (None,))[0] != key:
            layers = list(map(self._layer_weights, range(self.config.layers)))
            matrices = [w for layer in layers for w in layer[:2]] + [self.out.weight]
            exact = fp16_step.available() and not fp16_step.not_exact(matrices)
            self._fp16_cache = (key, fp16_step.Fp16Step(self.embed.weight, layers, self.out.weight, self.out.bias)
                                if exact else None)
        return self._fp16_cache[1]

    def _onnx_step(self, key: list, threads: int) -> OnnxStep:
        """The ONNX Runtime step over ``_prepared``'s weights, kept until the weights or the thread count
        change (switching runtimes back and forth rebuilds nothing)."""
        if getattr(self, "_onnx_cache", (None,))[0] != (key, threads):
            layers, out_t = self._prepared(key)
            self._onnx_cache = ((key, threads), OnnxStep(self.embed.weight, layers, out_t, self.out.bias, threads))
        return self._onnx_cache[1]

    def _layer_weights(self, layer: int) -> list[torch.Tensor]:
        return [getattr(self.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
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


@contextlib.contextmanager
def _one_cpu_thread():
    """Run the block with one torch CPU thread, then restore the count. With OpenMP and MKL the count is
    the calling thread's own; only threads making their first torch call meanwhile would inherit it."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
