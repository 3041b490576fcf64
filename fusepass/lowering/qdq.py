"""The quantize/dequantize ops no int8 kernel absorbed, spelled as the ATen they compute.

Why: ``quantized_decomposed``'s kernels are Python functions: a quantize is five ATen
ops with four fresh temporaries, behind a Python call. EfficientNet-B0's int8 graph keeps
51 quantizes and 18 dequantizes at batch 1 (squeeze-excite reads the depthwise conv's
float output, so that output is quantized by the graph, not by the kernel); they were a
fifth of its time. Spelled in the graph as the same ATen ops in the same order, they
compute the same values bit for bit, and ``inplace_pointwise`` runs the chain in place:
measured on a 1x144x56x56 channels-last tensor, quantize 575 -> 300 µs, dequantize 188 ->
~95 µs. (torch's native ``quantize_per_tensor`` is faster still but not the same
function: it multiplies by ``1.0f / float(scale)`` with a fused add, and 0.14 % of values
land one step away, measured; ties decide.)

Only the per-tensor ``.default`` overloads of float32 inputs and outputs are expanded:
that is the spelling these functions have in torch 2.13's
``torch/ao/quantization/fx/_decomposed.py``, which this module restates:

    quantize:   clamp(round(x * (1.0 / scale)) + zero_point, qmin, qmax).to(dtype)
    dequantize: (q.to(float32) - zero_point) * scale
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fusepass import ops as fp
from fusepass.ir import infer_meta, val

aten = torch.ops.aten


def _chain(g, x, steps) -> list:
    """``steps`` ((op, extra args, kwargs), ...) applied in turn to ``x``: the new nodes."""
    nodes = []
    for op, args, kwargs in steps:
        x = g.call_function(op, (x, *args), kwargs)
        nodes.append(x)
    return nodes


def _quantize(g, x, scale, zp, lo, hi, dtype):
    return _chain(g, x, [(aten.mul.Tensor, (1.0 / scale,), {}), (aten.round.default, (), {}),
                         (aten.add.Tensor, (zp,), {}), (aten.clamp.default, (lo, hi), {}),
                         (aten._to_copy.default, (), {"dtype": dtype})])


def _dequantize(g, q, scale, zp, lo, hi, dtype):
    return _chain(g, q, [(aten._to_copy.default, (), {"dtype": torch.float32}),
                         (aten.sub.Tensor, (zp,), {}), (aten.mul.Tensor, (scale,), {})])


def _expandable(n, qd) -> bool:
    if n.op != "call_function" or len(n.args) < 6:
        return False
    if not all(isinstance(a, (int, float)) for a in n.args[1:5]):
        return False  # qparams computed in the graph (dynamic) or constants: left alone
    x, y = val(n.args[0]), val(n)
    if n.target is qd.quantize_per_tensor.default:
        return x is not None and x.dtype == torch.float32 and not n.kwargs
    if n.target is qd.dequantize_per_tensor.default:
        out = n.kwargs.get("out_dtype", n.args[6] if len(n.args) > 6 else None)
        return y is not None and y.dtype == torch.float32 and out in (None, torch.float32)
    return False


def expand(gm: fx.GraphModule, report) -> int:
    """Expand every expandable quantize/dequantize; returns how many."""
    qd = fp.quantized_decomposed()
    build = {qd.quantize_per_tensor.default: _quantize,
             qd.dequantize_per_tensor.default: _dequantize}
    count = 0
    for n in list(gm.graph.nodes):
        if not _expandable(n, qd):
            continue
        with gm.graph.inserting_before(n):
            new = build[n.target](gm.graph, *n.args[:6])
        for m in new:
            infer_meta(gm, m)
        out = new[-1]
        out.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        out.meta["fusepass_spells"] = n.target.name()  # what this ATen chain computes
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        count += 1
    if count:
        report.record("lower", "aten", "-", "info",
                      f"{count} quantize/dequantize op(s) no int8 kernel absorbed spelled in "
                      "ATen (the same ops, so inplace_pointwise can run them in place)")
    return count
