"""The LSTM decoder's CPU inference step over float16-stored weights with float32 arithmetic, on PyTorch's own
FBGEMM kernels (``torch.ops.quantized.linear_dynamic_fp16``): half the bytes per word for the same numbers.

Why: a caption word is three matrix-vector products over 30 MB of float32 weights, so its time is the time to
stream those bytes (inside ``caption(path)`` mostly from memory: the encoder call before it most likely evicts them).
Every exported checkpoint, the bundled ones included, stores its weights in float16, so they are exactly
representable in half the bytes. FBGEMM keeps them packed in float16, widens them to float32 in registers and
multiplies and accumulates in float32 with float32 activations and biases: the products are the float32
products, only the summation order differs, as between any two float32 kernels (logits within 4e-6 of the
plain step on the bundled model). Measured on this 2-core CPU (benchmarks/README.md): one step at 1 row
0.31 ms against 0.52 ms on ONNX Runtime, 5 rows (a beam) 0.71 against 1.00 ms, level from ~16 rows on (500 rows:
45 against 42 ms); ``caption(path)`` p50 24.7 against 33.3 ms, 1.63x one encoder call. Weights that are not exact in
float16 (a model straight out of ``captioner train``) are never rounded: they take another runtime.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    """Whether FBGEMM's float16 linear runs here, tried once on a tiny product: x86 builds of torch have it, but
    FBGEMM refuses CPUs without AVX2, and ARM builds (Apple silicon) have no FBGEMM at all."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
        packed = torch.ops.quantized.linear_prepack_fp16(weight, torch.tensor([0.25, 0.0]))
        out = torch.ops.quantized.linear_dynamic_fp16(torch.tensor([[2.0, 1.0]]), packed)
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(out, torch.tensor([[0.25, 5.0]]))


def not_exact(weights: list[torch.Tensor]) -> bool:
    """Whether any of ``weights`` would change when stored in float16 (then this step must not be used)."""
    return any(not torch.equal(w.to(torch.float16).to(w.dtype), w) for w in weights)


class Fp16Step:
    """One decoder step, ``(tokens, h, c) -> (logits, h, c)``, for an LSTM of ``len(layers)`` layers.

    ``embed`` (V, E) is the embedding table, each of ``layers`` a ``(w_ih, w_hh, b_ih, b_hh)`` tuple as
    ``nn.LSTM`` stores them (PyTorch's gate order: input, forget, cell, output), ``out_w`` (V, H) and ``out_b``
    the vocabulary projection. The float16 copies are made once here (15 MB for the bundled model)."""

    def __init__(self, embed: torch.Tensor, layers: list[tuple[torch.Tensor, ...]], out_w: torch.Tensor,
                 out_b: torch.Tensor) -> None:
        pack = torch.ops.quantized.linear_prepack_fp16
        self.embed = embed
        # one product per layer: gates = [x, h] @ [w_ih, w_hh]^T + (b_ih + b_hh), biases kept in float32
        self.layers = [pack(torch.cat([w_ih, w_hh], 1).float(), (b_ih + b_hh).float())
                       for w_ih, w_hh, b_ih, b_hh in layers]
        self.out = pack(out_w.float(), out_b.float())

    def __call__(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        linear = torch.ops.quantized.linear_dynamic_fp16
        x, hs, cs = torch.nn.functional.embedding(tokens, self.embed), [], []  # (N, E)
        for layer, packed in enumerate(self.layers):
            gates = linear(torch.cat([x, h[layer].float()], 1), packed)  # (N, 4H)
            i, f, g, o = gates.chunk(4, 1)
            c_next = torch.sigmoid(f) * c[layer].float() + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c_next)  # (N, H)
            hs.append(x)
            cs.append(c_next)
        return linear(x, self.out), torch.stack(hs), torch.stack(cs)
