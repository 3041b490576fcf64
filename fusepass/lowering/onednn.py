"""The onednn target: stock PyTorch's oneDNN fused ops (``torch.ops.mkldnn.*``).

The table maps the shape of a post-op chain to a kernel builder. What oneDNN takes here
(measured on torch 2.13): fp32/bf16 only; unary attrs relu, sigmoid, tanh, swish,
hardswish, hardsigmoid, leaky_relu(slope), hardtanh(min, max), gelu(none|tanh) — no elu;
conv binary add/sub/mul/div optionally followed by relu (2-d/3-d convs only; in place
into ``other`` for add only); linear binary add/sub/mul with no unary after it; no
transposed conv here.
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from fusepass import ops as fp
from fusepass.ir import val
from fusepass.lowering.operands import operand_reason
from fusepass.lowering import inplace

mkldnn = torch.ops.mkldnn

# post-op name -> (oneDNN attr, algorithm); scalars pass through unchanged
UNARY = {
    "relu": ("relu", None), "sigmoid": ("sigmoid", None), "tanh": ("tanh", None),
    "silu": ("swish", None), "hardswish": ("hardswish", None),
    "hardsigmoid": ("hardsigmoid", None), "leaky_relu": ("leaky_relu", None),
    "hardtanh": ("hardtanh", None), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
}
CONV_BINARY = {"add", "sub", "mul", "div"}
CONV_AFTER_BINARY = {"relu"}
LINEAR_BINARY = {"add", "sub", "mul"}


def _same_shape(other, out_node):
    o, y = val(other), val(out_node)
    return o is not None and y is not None and tuple(o.shape) == tuple(y.shape)


def _emit(gm, node, target, args):
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args))
    new.meta.update(node.meta)  # same values and layout as the fused op's reference
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def lower_conv(gm, node):
    (x, w, b, stride, padding, dilation, transposed, output_padding, groups,
     other, post, scalars) = node.args
    if transposed:
        return "transposed convolution has no lowering in the onednn target"
    reason = operand_reason("oneDNN", x, w, b, other)
    if reason:
        return reason
    chain = list(post)
    if not chain or (len(chain) == 1 and chain[0] in UNARY):
        attr, alg = UNARY[chain[0]] if chain else ("none", None)
        args = (x, w, b, padding, stride, dilation, groups, attr, list(scalars), alg)
        return "mkldnn._convolution_pointwise", _emit(gm, node, mkldnn._convolution_pointwise.default, args)
    if chain[0] in CONV_BINARY and (len(chain) == 1 or (len(chain) == 2 and chain[1] in CONV_AFTER_BINARY)):
        if not _same_shape(other, node):
            return "binary operand does not have the conv output's shape"
        return _lower_conv_binary(gm, node, chain)
    return f"no oneDNN conv kernel for post-op chain {chain}"


def _suggests_channels_last(n) -> bool:
    """``Tensor.suggest_memory_format()`` is channels-last (what the kernels test on x, w)."""
    v = val(n)
    return v is not None and v.dim() in (4, 5) and suggest_memory_format(v) in (
        torch.channels_last, torch.channels_last_3d)


def _channels_last_contiguous(n) -> bool:
    """``is_contiguous(ChannelsLast[3d])`` (what the in-place kernel tests on other)."""
    v = val(n)
    return v is not None and v.dim() in (4, 5) and v.is_contiguous(
        memory_format=torch.channels_last if v.dim() == 4 else torch.channels_last_3d)


def _lower_conv_binary(gm, node, chain):
    """Out-of-place ``_convolution_pointwise.binary`` or, when ``other`` is dead after the
    op (``inplace.why_not_inplace``) and the op is an add, oneDNN's sum post-op in place
    (``_convolution_pointwise_.binary`` writes into ``other``). Measured on torch 2.13:
    both take 2-d/3-d convs only; their fused path needs channels-last input or weight
    (out-of-place also groups == 1; in-place also a channels-last ``other``), otherwise
    they fall back to conv + ``add_relu_``, which has no bf16 kernel (internal assert)."""
    x, w, b, stride, padding, dilation, _, _, groups, other = node.args[:10]
    if val(x).dim() not in (4, 5):
        return "oneDNN's binary conv kernels take 2-d and 3-d convolutions only"
    binop, unary = chain[0], (chain[1] if len(chain) == 2 else None)
    bf16_add_relu = val(x).dtype == torch.bfloat16 and chain == ["add", "relu"]
    fused_path = _suggests_channels_last(x) or _suggests_channels_last(w)
    why_not = (f"out-of-place: only add accumulates in place, not {binop}" if binop != "add"
               else inplace.why_not_inplace(node, other, reads=(x, w, b)))
    if why_not is None and bf16_add_relu and not (fused_path and _channels_last_contiguous(other)):
        why_not = "out-of-place: bf16 add+relu in place needs channels-last input and other"
    if why_not is None:
        args = (other, x, w, b, padding, stride, dilation, groups, "add", None, unary, [], None)
        new = _emit(gm, node, mkldnn._convolution_pointwise_.binary, args)
        new.meta["fusepass_lowering_note"] = (
            f"in place into {other.name} (dead after the op; no input, output, constant "
            "or alias of anything live)")
        return "mkldnn._convolution_pointwise_.binary", new
    if bf16_add_relu and not (fused_path and groups == 1):
        return ("bf16 add+relu on a non-channels-last or grouped conv: oneDNN falls back "
                "to add_relu_, which has no bf16 kernel")
    args = (x, other, w, b, padding, stride, dilation, groups, binop, None, unary, [], None)
    new = _emit(gm, node, mkldnn._convolution_pointwise.binary, args)
    new.meta["fusepass_lowering_note"] = why_not if why_not.startswith("out-of-place") else (
        f"out-of-place: {why_not}")
    return "mkldnn._convolution_pointwise.binary", new


def lower_linear(gm, node):
    x, w, b, other, post, scalars = node.args
    reason = operand_reason("oneDNN", x, w, b, other)
    if reason:
        return reason
    if val(x).dim() < 2:
        return "linear on a 1-d input"
    chain = list(post)
    if not chain or (len(chain) == 1 and chain[0] in UNARY):
        attr, alg = UNARY[chain[0]] if chain else ("none", None)
        args = (x, w, b, attr, list(scalars), alg)
        return "mkldnn._linear_pointwise", _emit(gm, node, mkldnn._linear_pointwise.default, args)
    if len(chain) == 1 and chain[0] in LINEAR_BINARY:
        if not _same_shape(other, node):
            return "binary operand does not have the linear output's shape"
        args = (x, other, w, b, chain[0])
        return "mkldnn._linear_pointwise.binary", _emit(gm, node, mkldnn._linear_pointwise.binary, args)
    return f"no oneDNN linear kernel for post-op chain {chain}"


TABLE = {fp.conv: lower_conv, fp.linear: lower_linear}


def lower_node(gm, node):
    return TABLE[node.target](gm, node)
