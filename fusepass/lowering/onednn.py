"""The onednn target: stock PyTorch's oneDNN fused ops (``torch.ops.mkldnn.*``).

Its rows of the lowering table (``fusepass/lowering/table.py``), keyed by fused op and
chain shape; the post-op attrs come from the registry (``fusepass/postops.py``,
``kernels["onednn"]``). What oneDNN takes here (measured on torch 2.13): fp32, and bf16
where the CPU has native bf16; unary attrs relu, sigmoid, tanh, swish, hardswish,
hardsigmoid, leaky_relu(slope), hardtanh(min, max), gelu(none|tanh) — no elu ("Fusion
behavior undefined"); conv binary add/sub/mul/div optionally followed by relu (2-d/3-d
convs only; in place into ``other`` for add only); linear binary add/sub/mul with no
unary after it; no transposed conv.
"""
from __future__ import annotations

import functools
import math

import torch

from fusepass import ops as fp
from fusepass.ir import emit, restride, suggest_memory_format, val
from fusepass.lowering.operands import operand_reason
from fusepass.ops import KERNEL_DTYPES
from fusepass.ir import alias
from fusepass.lowering.table import register
from fusepass.postops import REGISTRY

mkldnn = torch.ops.mkldnn
UNARY_SHAPES, BINARY_SHAPES = [(), ("unary",)], [("binary",), ("binary", "unary")]


def _unary_attr(post, family):
    """(attr, algorithm) of the chain's one unary post-op, ("none", None) without one."""
    k = next((REGISTRY[p].kernel("onednn", family) for p in post if not REGISTRY[p].binary), None)
    return (k.attr, k.algorithm) if k else ("none", None)


def _same_shape_reason(f):
    o, y = f.other, f.out
    if o is None or y is None or tuple(o.shape) != tuple(y.shape):
        return f"binary operand does not have the {f.family} output's shape"
    return None


def _operands(f, *extra):
    return operand_reason("oneDNN", f.x, f.weight, f.bias, f.other, *extra)


def kernel_format(x, w, dim):
    """The memory format stock oneDNN's conv writes (ATen's mkldnn Conv.cpp, torch 2.13):
    channels-last for 4-d/5-d when the input or the weight suggests it, else contiguous
    (conv1d always). A packed weight makes it channels-last too (prepack_weights packs only
    where the result already is)."""
    if dim in (4, 5) and (_suggests_channels_last(x) or _suggests_channels_last(w)):
        return torch.channels_last if dim == 4 else torch.channels_last_3d
    return torch.contiguous_format


def kernel_strides(x, w, y) -> tuple:
    """The strides the out-of-place conv kernel writes for the result ``y``."""
    fmt = kernel_format(x, w, y.dim())
    return tuple(torch.empty(y.shape, device="meta", memory_format=fmt).stride())


def layout_reason(f):
    """The kernel writes the memory layout eager gives (``f.out``'s): eager picks its conv
    kernel by heuristics, and a 3-d conv fed channels-last, or a conv1d fed a permuted
    input, comes back in another layout than oneDNN's. Strides that differ only in size-1
    dims (a one-channel result after relu: eager's CPU kernel makes it contiguous, the
    conv writes channels-last) are restrided by the builder (``restride``)."""
    y = f.out
    if f.x is None or y is None or not isinstance(y, torch.Tensor):
        return None
    want = kernel_strides(f.x, f.weight, y)
    fmt = kernel_format(f.x, f.weight, y.dim())
    if all(a == b for a, b, d in zip(want, y.stride(), y.shape) if d > 1):
        return None
    return (f"oneDNN's conv writes {str(fmt).replace('torch.', '')} {tuple(want)}, eager "
            f"gives strides {tuple(y.stride())}")


def conv_check(f):
    if f.transposed:
        return "transposed convolution has no lowering in the onednn target"
    return _operands(f) or layout_reason(f)


def conv_binary_check(f):
    if f.x is not None and f.x.dim() not in (4, 5):
        return "oneDNN's binary conv kernels take 2-d and 3-d convolutions only"
    return conv_check(f) or _same_shape_reason(f) or ambiguous_output_reason(f)


def lower_conv(gm, node):
    (x, w, b, stride, padding, dilation, transposed, output_padding, groups,
     other, post, scalars) = node.args
    attr, alg = _unary_attr(post, "conv")
    args = (x, w, b, padding, stride, dilation, groups, attr, list(scalars), alg)
    new = emit(gm, node, mkldnn._convolution_pointwise.default, args)
    restride(gm, new, kernel_strides(val(x), val(w), val(new)))
    return "mkldnn._convolution_pointwise", new


def _suggests_channels_last(v) -> bool:
    """``Tensor.suggest_memory_format()`` is channels-last (what the kernels test on x, w)."""
    return v is not None and v.dim() in (4, 5) and suggest_memory_format(v) in (
        torch.channels_last, torch.channels_last_3d)


def _channels_last_contiguous(n) -> bool:
    """``is_contiguous(ChannelsLast[3d])`` (what the in-place kernel tests on other)."""
    v = val(n)
    return v is not None and v.dim() in (4, 5) and v.is_contiguous(
        memory_format=torch.channels_last if v.dim() == 4 else torch.channels_last_3d)


def bf16_add_relu_reason(x, w, groups):
    if not ((_suggests_channels_last(x) or _suggests_channels_last(w)) and groups == 1):
        return ("bf16 add+relu on a non-channels-last or grouped conv: oneDNN falls back "
                "to add_relu_, which has no bf16 kernel")
    return None


def lower_conv_binary(gm, node):
    """Out-of-place ``_convolution_pointwise.binary`` or, when ``other`` is dead after the
    op (``alias.why_not_inplace``) and the op is an add, oneDNN's sum post-op in place
    (``_convolution_pointwise_.binary`` writes into ``other``). Measured on torch 2.13:
    both take 2-d/3-d convs only; their fused path needs channels-last input or weight
    (out-of-place also groups == 1; in-place also a channels-last ``other``), otherwise
    they fall back to conv + ``add_relu_``, which has no bf16 kernel (internal assert)."""
    x, w, b, stride, padding, dilation, _, _, groups, other, chain = node.args[:11]
    binop, unary = chain[0], (chain[1] if len(chain) == 2 else None)
    bf16_add_relu = val(x).dtype == torch.bfloat16 and chain == ["add", "relu"]
    fused_path = _suggests_channels_last(val(x)) or _suggests_channels_last(val(w))
    why_not = (f"out-of-place: only add accumulates in place, not {binop}" if binop != "add"
               else alias.why_not_inplace(node, other, reads=(x, w, b)))
    if why_not is None and bf16_add_relu and not (fused_path and _channels_last_contiguous(other)):
        why_not = "out-of-place: bf16 add+relu in place needs channels-last input and other"
    if why_not is None:
        args = (other, x, w, b, padding, stride, dilation, groups, "add", None, unary, [], None)
        new = emit(gm, node, mkldnn._convolution_pointwise_.binary, args)
        restride(gm, new, tuple(val(other).stride()))
        new.meta["fusepass_lowering_note"] = (
            f"in place into {other.name} (dead after the op; no input, output, constant "
            "or alias of anything live)")
        return "mkldnn._convolution_pointwise_.binary", new
    args = (x, other, w, b, padding, stride, dilation, groups, binop, None, unary, [], None)
    new = emit(gm, node, mkldnn._convolution_pointwise.binary, args)
    restride(gm, new, kernel_strides(val(x), val(w), val(new)))
    new.meta["fusepass_lowering_note"] = why_not if why_not.startswith("out-of-place") else (
        f"out-of-place: {why_not}")
    return "mkldnn._convolution_pointwise.binary", new


@functools.cache
def binary_one_channel_works(dim: int = 4) -> bool:
    """torch 2.8's oneDNN (the IPEX env) raises "could not create a memory" for a binary
    conv run channels-last whose output is one channel or one pixel (not both: a
    layout-ambiguous output; measured over C in 1..3, HxW in 1x1, 1x2, 2x2 and DxHxW in
    1x1x1, 1x1x2, 1x2x2, 2x2x2, batch 1 and 3); torch 2.13's runs them all. The cases are
    degenerate convs; declining them costs nothing that counts. Probed once per ``dim``
    (4: conv2d, 5: conv3d) on a one-channel output, as the kernel would be called."""
    fmt = torch.channels_last if dim == 4 else torch.channels_last_3d
    one = [1] * (dim - 2)
    x = torch.randn(1, 4, *[2] * (dim - 2)).to(memory_format=fmt)
    other = torch.randn(1, 1, *[2] * (dim - 2)).to(memory_format=fmt)
    try:
        mkldnn._convolution_pointwise.binary(x, other, torch.randn(1, 4, *one), None, [0] * len(one),
                                             one, one, 1, "add", None, None, [], None)
        return True
    except RuntimeError:
        return False


def ambiguous_output_reason(f):
    """``binary_one_channel_works``'s case. Whatever the input's layout: the kernel runs
    channels-last with a packed weight too (prepack_weights decides that after lowering),
    and a contiguous one-channel input failed the same way. Shapes only, so the early
    check (``conv_binary_check``, asked at fusion and again at lowering) decides it."""
    y = f.out
    if (isinstance(y, torch.Tensor) and y.dim() in (4, 5)
            and (y.shape[1] == 1) != (math.prod(y.shape[2:]) == 1)
            and not binary_one_channel_works(y.dim())):
        return (f"torch {torch.__version__}'s oneDNN cannot create the memory of a "
                "binary conv with one output channel or one output pixel (probed)")
    return None


def conv_binary_layout_check(f):
    """What only lowering can check: the layout the kernel sees (propagate_layout, which
    runs after fusion, may still make a conv channels-last)."""
    if f.dtype == torch.bfloat16 and list(f.post) == ["add", "relu"]:
        return bf16_add_relu_reason(f.x, f.weight, f.groups)
    return None


def linear_check(f):
    if f.x is not None and f.x.dim() < 2:
        return "linear on a 1-d input"
    return _operands(f)


def linear_binary_check(f):
    return linear_check(f) or _same_shape_reason(f)


def lower_linear(gm, node):
    x, w, b, other, post, scalars = node.args
    attr, alg = _unary_attr(post, "linear")
    args = (x, w, b, attr, list(scalars), alg)
    return "mkldnn._linear_pointwise", emit(gm, node, mkldnn._linear_pointwise.default, args)


def lower_linear_binary(gm, node):
    x, w, b, other, post, scalars = node.args
    args = (x, other, w, b, post[0])
    return "mkldnn._linear_pointwise.binary", emit(gm, node, mkldnn._linear_pointwise.binary, args)


register("onednn", fp.conv, UNARY_SHAPES, KERNEL_DTYPES, conv_check, lower_conv)
register("onednn", fp.conv, BINARY_SHAPES, KERNEL_DTYPES, conv_binary_check, lower_conv_binary,
         late_check=conv_binary_layout_check)
register("onednn", fp.linear, UNARY_SHAPES, KERNEL_DTYPES, linear_check, lower_linear)
register("onednn", fp.linear, [("binary",)], KERNEL_DTYPES, linear_binary_check, lower_linear_binary)
