"""The LSTM decoder's CPU inference step on ONNX Runtime: the same arithmetic as
``CaptionDecoder._step_small``, run by a runtime whose matrix-vector products use both cores.

Why: one photo's caption is ~12 steps of three matrix-vector products (30 MB of fp32 weights per word), and
torch runs a 1-row product on one thread at ~26 GB/s; spreading it over two threads through torch's own pool
stalled on every parallel region (benchmarks/README.md). ONNX Runtime's MLAS kernels ran the bundled model's
step at 1 row in 0.42 ms with two threads against torch's 1.13 ms (5 rows, a beam: 0.67 against 3.20 ms; 500
rows: 19.4 against 42.1 ms), within 3e-6 of torch's logits. Its threads do not spin between steps: spinning
ones took the cores from the encoder's torch threads that run next. The graph is written here with
``onnx.helper`` from the weights ``_step_small`` already prepares, not traced by an exporter: it is a dozen
operators per layer, and it cannot drift from the model's gate order unnoticed
(``tests/test_decoder_small_batch.py`` compares it with torch). Without ``onnxruntime`` and ``onnx`` installed
the torch path runs, with the same captions. Weights stored in float16 (every exported checkpoint) run on
``captioner/fp16_step.py`` instead, faster at the few rows of one photo's caption; this step runs float32 ones.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch


@functools.cache
def available() -> bool:
    """Whether both packages the ONNX step needs are importable (asked at every step: answered once)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class OnnxStep:
    """One decoder step, ``(tokens, h, c) -> (logits, h, c)``, for an LSTM of ``len(layers)`` layers.

    ``embed`` (V, E) is the embedding table, each of ``layers`` a ``(W, b)`` pair with ``W`` (E+H, 4H) the
    pre-transposed concatenation of ``weight_ih`` and ``weight_hh`` and ``b`` their summed biases (PyTorch's
    gate order: input, forget, cell, output), ``out_t`` (H, V) and ``out_b`` the vocabulary projection."""

    def __init__(self, embed: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], out_t: torch.Tensor,
                 out_b: torch.Tensor, threads: int) -> None:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its optimiser's notes are not the user's concern
        # no busy-waiting between steps: spinning threads took the cores from the encoder's torch threads that
        # run next (an encoder call inside caption(path) went from 8 to 22 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(_graph(embed, layers, out_t, out_b).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {"tokens": tokens.numpy().astype(np.int64, copy=False), "h": h.float().numpy(), "c": c.float().numpy()}
        return tuple(torch.from_numpy(x) for x in self.session.run(None, feeds))


def _graph(embed: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], out_t: torch.Tensor,
           out_b: torch.Tensor):
    """The step as an ONNX model (opset 17): per layer ``gates = [x, h] @ W + b``, then the LSTM cell."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: torch.Tensor | np.ndarray):
        array = value.detach().float().numpy() if isinstance(value, torch.Tensor) else value
        return numpy_helper.from_array(np.array(array, order="C"), name)  # (ascontiguousarray would make a scalar 1-d)

    hidden = layers[0][0].shape[1] // 4
    init = [const("embed", embed), const("out_t", out_t), const("out_b", out_b),
            const("split4", np.full(4, hidden, dtype=np.int64))]
    nodes = [helper.make_node("Gather", ["embed", "tokens"], ["x0"])]
    h_out, c_out = [], []
    x = "x0"
    for n, (w, b) in enumerate(layers):
        init += [const(f"w{n}", w), const(f"b{n}", b), const(f"layer{n}", np.array(n, dtype=np.int64))]
        p = f"l{n}_"
        nodes += [
            helper.make_node("Gather", ["h", f"layer{n}"], [p + "h"], axis=0),
            helper.make_node("Gather", ["c", f"layer{n}"], [p + "c"], axis=0),
            helper.make_node("Concat", [x, p + "h"], [p + "xh"], axis=1),
            helper.make_node("Gemm", [p + "xh", f"w{n}", f"b{n}"], [p + "gates"]),
            helper.make_node("Split", [p + "gates", "split4"], [p + g for g in "ifgo"], axis=1),
            *[helper.make_node("Sigmoid", [p + g], [p + g + "s"]) for g in "ifo"],
            helper.make_node("Tanh", [p + "g"], [p + "gt"]),
            helper.make_node("Mul", [p + "fs", p + "c"], [p + "fc"]),
            helper.make_node("Mul", [p + "is", p + "gt"], [p + "ig"]),
            helper.make_node("Add", [p + "fc", p + "ig"], [p + "c2"]),
            helper.make_node("Tanh", [p + "c2"], [p + "ct"]),
            helper.make_node("Mul", [p + "os", p + "ct"], [p + "h2"]),
        ]
        x = p + "h2"
        h_out.append(p + "h2")
        c_out.append(p + "c2")
    nodes.append(helper.make_node("Gemm", [x, "out_t", "out_b"], ["logits"]))
    for name, parts in (("h_next", h_out), ("c_next", c_out)):  # (N, H) per layer -> (L, N, H)
        unsqueezed = [f"{part}_u" for part in parts]
        nodes += [helper.make_node("Unsqueeze", [part, "axis0"], [u]) for part, u in zip(parts, unsqueezed)]
        nodes.append(helper.make_node("Concat", unsqueezed, [name], axis=0))
    init.append(const("axis0", np.array([0], dtype=np.int64)))
    rows = "n"
    graph = helper.make_graph(
        nodes, "caption_step",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [rows]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [len(layers), rows, hidden]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [len(layers), rows, hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [rows, out_t.shape[1]]),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [len(layers), rows, hidden]),
         helper.make_tensor_value_info("c_next", TensorProto.FLOAT, [len(layers), rows, hidden])],
        init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
