"""Which ops may run inside an NHWC (channels-last) region, and how: the table that
``passes/propagate_layout.py`` reads.

A region is a connected set of ops that compute the same values whatever the memory
format of their 4-D activations and hand channels-last on when they get it (ATen kernels
and the oneDNN ones follow their input's layout). Each row names which arguments are
activations: those are converted at the region entry; the others (weights, BN stats,
scalars) are left alone. Anything not in the table needs the layout eager gave it, so a
region value flowing into it is converted back (views, reshapes, permutes, matmuls on the
channel dim, graph outputs).

The conversion spelling, the one used everywhere in the IR:
    to NHWC:  aten.clone.default(x, memory_format=torch.channels_last)
    back:     aten.clone.default(x, memory_format=torch.contiguous_format)
(``meta["fusepass_layout"]`` = "to_nhwc" / "to_nchw" marks the ones the pass inserts).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fusepass import ops as fp
from fusepass.ir import full_args
from fusepass.postops import REGISTRY

aten = torch.ops.aten
CL = torch.channels_last
SPATIAL = {2, 3, -1, -2}
CHANNEL = {1, -3}


@dataclass(frozen=True)
class LayoutRule:
    activations: tuple | str  # positions of activation args, or "all" (every tensor arg)
    when: Optional[Callable] = None  # (full args) -> bool: the op is tolerant with these args


def _arg(i, ok):
    return lambda a: len(a) > i and ok(a[i])


_channel_dim = _arg(1, lambda d: d in CHANNEL)
_ALL = LayoutRule("all")
_FIRST = LayoutRule((0,))

RULES: dict = {
    # conv2d: input and the fused binary operand (`other`) are activations
    fp.conv: LayoutRule((0, 9), lambda a: a[1].meta["val"].dim() == 4),
    fp.qconv: LayoutRule((0, 9), lambda a: a[1].meta["val"].dim() == 4),  # int8: same roles
    # batch norm (inference) and pooling: per-channel or per-plane, any layout
    aten.native_batch_norm.default: LayoutRule((0,), _arg(5, lambda training: not training)),
    aten._native_batch_norm_legit_no_training.default: _FIRST,
    aten.max_pool2d_with_indices.default: _FIRST,
    aten.avg_pool2d.default: _FIRST,
    aten._adaptive_avg_pool2d.default: _FIRST,
    aten.adaptive_max_pool2d.default: _FIRST,
    aten.mean.dim: LayoutRule((0,), _arg(1, lambda dims: set(dims or ()) <= SPATIAL and dims)),
    aten.sum.dim_IntList: LayoutRule((0,), _arg(1, lambda dims: set(dims or ()) <= SPATIAL and dims)),
    # resampling and padding
    aten.upsample_nearest2d.default: _FIRST,
    aten.upsample_nearest2d.vec: _FIRST,
    aten.upsample_bilinear2d.default: _FIRST,
    aten.upsample_bilinear2d.vec: _FIRST,
    aten.constant_pad_nd.default: _FIRST,
    aten.reflection_pad2d.default: _FIRST,
    aten.replication_pad2d.default: _FIRST,
    # concat / split / slice on the channel dim
    aten.cat.default: LayoutRule((0,), _channel_dim),
    aten.split.Tensor: LayoutRule((0,), _arg(2, lambda d: d in CHANNEL)),
    aten.split_with_sizes.default: LayoutRule((0,), _arg(2, lambda d: d in CHANNEL)),
    aten.slice.Tensor: LayoutRule((0,), _channel_dim),
    # a plain copy keeps its input's layout
    aten.clone.default: LayoutRule((0,), _arg(1, lambda f: f in (None, torch.preserve_format))),
    # a dtype conversion that keeps the layout (the int8 average pooling rows' spelling)
    aten._to_copy.default: LayoutRule((0,), lambda a: a[6] in (None, torch.preserve_format)
                                      and a[2:5] == [None, None, None]),
    # getitem of a member's tuple (BN, max-pool, split): passthrough
    operator.getitem: LayoutRule((), None),
}
# pointwise: every tensor argument is an activation (broadcast operands such as [C,1,1]
# or [N,C,1,1] are channels-last already and need no conversion): the registry's
# layout-tolerant post-ops, their Scalar forms, and pointwise ops that are no post-ops
RULES.update({p.aten: _ALL for p in REGISTRY.values() if p.layout_tolerant and p.aten})
for _op in ["add", "sub", "mul", "div"]:
    RULES[getattr(aten, _op).Scalar] = _ALL
for _op in ["mish", "neg", "abs", "exp", "sqrt", "rsqrt", "reciprocal", "erf", "softplus",
            "maximum", "minimum"]:
    RULES[getattr(aten, _op).default] = _ALL
RULES.update({aten.clamp.default: _ALL, aten.pow.Tensor_Scalar: _ALL, aten.where.self: _ALL,
              aten.round.default: _ALL, aten.div.Scalar_mode: _ALL})
# PT2E's per-tensor quantize/dequantize: elementwise, the scale and zero point are numbers
_qd = fp.quantized_decomposed()
RULES.update({_qd.quantize_per_tensor.default: _FIRST, _qd.dequantize_per_tensor.default: _FIRST,
              torch.ops.quantized.max_pool2d.default: _FIRST})  # int8 max pooling


def rule_for(node) -> Optional[LayoutRule]:
    """The row for a node if it is layout-tolerant with these arguments, else None."""
    if node.op != "call_function":
        return None
    r = RULES.get(node.target)
    if r is None or node.target is operator.getitem:
        return r
    args = full_args(node)
    x = args[0][0] if isinstance(args[0], (list, tuple)) and args[0] else args[0]
    if not is4d(x):
        return None
    return r if r.when is None or r.when(args) else None


def activation_inputs(node) -> list:
    """Activation nodes feeding ``node`` (4-D tensors), in argument order, no duplicates."""
    r = RULES[node.target]
    if r.activations == "all":
        cands = node.all_input_nodes
    else:
        args = full_args(node)
        cands = []
        for i in r.activations:
            a = args[i] if i < len(args) else None
            cands += list(a) if isinstance(a, (list, tuple)) else [a]
    return list(dict.fromkeys(a for a in cands if is4d(a)))


# ------------------------------------------------------------------ layout queries
def is4d(node) -> bool:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 4


def cl_strides(shape) -> tuple:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def is_nhwc(t: torch.Tensor) -> bool:
    """Already channels-last (includes tensors that are both, e.g. [N,C,1,1])."""
    return t.dim() == 4 and t.is_contiguous(memory_format=CL)


def format_of(t: torch.Tensor):
    """The memory format eager gave ``t``: channels_last only when it is not also
    contiguous; anything else (contiguous, channel slices) restores to contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=CL):
        return CL
    return torch.contiguous_format


def satisfies(shape, strides, fmt) -> bool:
    probe = torch.empty_strided(shape, strides, device="meta")
    return probe.is_contiguous(memory_format=fmt)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def conv_flops(node) -> int:
    w, y = node.args[1].meta["val"], node.meta["val"]
    return 2 * y.numel() * w[0].numel()  # w[0] = Cin/groups * kh * kw
