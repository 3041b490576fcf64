"""The onednn target's int8 rows: ``fusepass::qconv``/``qlinear`` -> stock PyTorch's
oneDNN int8 kernels (``torch.ops.onednn.qconv_pointwise`` / ``qconv2d_pointwise.binary``
/ ``qlinear_pointwise``), weights packed once here (``qconv_prepack`` /
``qlinear_prepack``: the kernels take no dense weight).

Measured on torch 2.13 (fp32 reference = the q/dq decomposition, ``ops.qconv_reference``):
  * qconv takes u8 input in any layout and writes channels-last, float32 or requantized
    u8/s8; its unary post-ops: relu, hardtanh, hardswish, swish (the registry's ``qconv``
    family); the sum post-op (``.binary``, 2-d convs) accumulates into ``accum`` in place
    and needs it channels-last contiguous, of the output's dtype (float32, or the
    quantized residual for a quantized output), optionally followed by relu;
  * qlinear takes u8 input of any rank >= 2 and writes a contiguous result; unary relu,
    gelu (none/tanh), tanh, swish, hardtanh, leaky_relu, hardswish; binary ``sum`` (in
    place into ``other``) or ``add`` (out of place) with a float ``other``, relu after;
    ``fusepass::qlinear.tensor`` (dynamic quantization) -> the ``.tensor`` /
    ``.binary_tensor`` overloads, which take the per-call scale and zero point as tensors.
Where the kernel's layout differs from eager's (a conv outside a channels-last region:
``propagate_layout`` declined), the result is converted back once, said in the report.
"""
from __future__ import annotations

import torch

from fusepass import ops as fp
from fusepass.ir import add_constant, alias, constant, val, value_mode
from fusepass.layout_rules import cl_strides
from fusepass.lowering.table import register
from fusepass.postops import REGISTRY

onednn = torch.ops.onednn
aten = torch.ops.aten
U8 = (torch.uint8,)


def _unary(post, family):
    """(attr, scalars, algorithm) of the chain's one unary post-op."""
    i = 0
    for p in post:
        op = REGISTRY[p]
        if not op.binary:
            k = op.kernel("onednn", family)
            return k.attr, i, k.algorithm
        i += op.arity
    return "none", None, None


def _unary_args(node, family):
    _, post, scalars = fp.chain_of(node)
    attr, i, alg = _unary(post, family)
    sc = [] if i is None else list(scalars[i:i + REGISTRY[next(p for p in post if not REGISTRY[p].binary)].arity])
    return attr, sc, alg


def _q(node, name):
    return node.args[fp.QPARAMS[node.target][name]]


def _out_dtype(node):
    return _q(node, "out_dtype") or torch.float32


def _layout_reason(f):
    y = f.out
    if y is None or y.dim() != 4:
        return None
    if tuple(y.stride()) == cl_strides(y.shape) or y.is_contiguous():
        return None
    return f"eager gives strides {tuple(y.stride())}: neither channels-last nor contiguous"


def _missing(*names):
    """The int8 kernels this torch lacks (torch 2.8's onednn namespace has no generic
    ``qconv_pointwise``)."""
    gone = [n for n in names if not hasattr(onednn, n.split(".")[0])
            or not hasattr(getattr(onednn, n.split(".")[0]), n.split(".")[1] if "." in n else "default")]
    return f"torch {torch.__version__} has no onednn.{', onednn.'.join(gone)}" if gone else None


def qconv_check(f):
    reason = _missing("qconv_prepack", "qconv_pointwise", "qconv2d_pointwise.binary")
    if reason:
        return reason
    if f.transposed:
        return "transposed int8 convolution has no onednn kernel"
    if f.weight is None or f.weight.dim() != 4:
        return "oneDNN's int8 conv rows take 2-d convolutions"
    return None


def qconv_binary_check(f):
    o, y = f.other, f.out
    if o is None or y is None or tuple(o.shape) != tuple(y.shape):
        return "binary operand does not have the conv output's shape"
    if o.dtype != y.dtype:
        return f"residual dtype {o.dtype} differs from the output's {y.dtype} (sum accumulates into it)"
    return qconv_check(f)


def qlinear_check(f):
    reason = _missing("qlinear_prepack", "qlinear_pointwise", "qlinear_pointwise.binary",
                      *(("qlinear_pointwise.tensor", "qlinear_pointwise.binary_tensor")
                        if f.op is fp.qlinear_dynamic else ()))
    if reason:
        return reason
    if f.x is None or f.x.dim() < 2:
        return "int8 linear on a 1-d input"
    if f.out is not None and not f.out.is_contiguous():
        return f"eager gives strides {tuple(f.out.stride())}; the kernel writes contiguous"
    return None


def qlinear_binary_check(f):
    o, y = f.other, f.out
    if o is None or y is None or tuple(o.shape) != tuple(y.shape):
        return "binary operand does not have the linear output's shape"
    if y.dtype != torch.float32 or o.dtype != torch.float32:
        return "int8 linear with a binary post-op: float32 output and operand only"
    return qlinear_check(f)


def _packed(gm, node, tensor, hint):
    w = node.args[1]
    c = add_constant(gm, tensor, hint, before=node, source=w.meta.get("fusepass_source"))
    c.meta["val"] = w.meta["val"]  # an opaque MKLDNN tensor: meta is the dense weight's
    return c


def _pack_conv(gm, node):
    x, w, b, stride, padding, dilation, _, _, groups = node.args[:9]
    packed = onednn.qconv_prepack(constant(gm, w), constant(gm, _q(node, "w_scale")),
                                  _q(node, "x_scale"), _q(node, "x_zp"), list(stride),
                                  list(padding), list(dilation), groups,
                                  list(val(x).shape))  # oneDNN picks the weight format for it
    return _packed(gm, node, packed, "qconv_w")


def _finish(gm, node, new, kernel, note=None):
    """``new`` computes ``node`` in the kernel's layout: adopt it, converting back to
    eager's layout once if they differ."""
    y = val(node)
    cl = y is not None and y.dim() == 4
    new.meta.update(node.meta)
    out = new
    if cl and tuple(y.stride()) != cl_strides(y.shape):
        new.meta["val"] = _cl_fake(gm, y)
        with gm.graph.inserting_after(new):
            out = gm.graph.call_function(aten.clone.default, (new,),
                                         {"memory_format": torch.contiguous_format})
        out.meta.update(node.meta)
        note = "; ".join(filter(None, [note, "channels-last result converted to eager's "
                                       "contiguous layout (conv outside a channels-last region)"]))
    if note:
        new.meta["fusepass_lowering_note"] = note
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return kernel, new


def _cl_fake(gm, y):
    """A value like ``y`` (fake or meta, as the graph's), channels-last."""
    with value_mode(gm):
        return torch.empty_strided(y.shape, cl_strides(y.shape), dtype=y.dtype)


def lower_qconv(gm, node):
    x, w, b, stride, padding, dilation, _, _, groups = node.args[:9]
    attr, sc, alg = _unary_args(node, "qconv")
    pw = _pack_conv(gm, node)
    args = (x, _q(node, "x_scale"), _q(node, "x_zp"), pw, _q(node, "w_scale"), _q(node, "w_zp"),
            b, list(stride), list(padding), list(dilation), groups, _q(node, "out_scale"),
            _q(node, "out_zp"), _out_dtype(node), attr, sc, alg or "")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(onednn.qconv_pointwise.default, args)
    return _finish(gm, node, new, "onednn.qconv_pointwise")


def _channels_last(n) -> bool:
    v = val(n)
    return v is not None and v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last)


def lower_qconv_binary(gm, node):
    x, w, b, stride, padding, dilation, _, _, groups, other = node.args[:10]
    attr, sc, alg = _unary_args(node, "qconv")
    why = alias.why_not_inplace(node, other, reads=(x, w, b))
    if why is None and not _channels_last(other):
        why = "the residual is not channels-last"
    accum, note = other, f"in place into {other.name} (dead after the op)"
    if why is not None:  # the kernel writes into accum: give it a channels-last copy
        with gm.graph.inserting_before(node):
            accum = gm.graph.call_function(aten.clone.default, (other,),
                                           {"memory_format": torch.channels_last})
        accum.meta["val"] = _cl_fake(gm, val(other))
        note = f"sum into a channels-last copy of {other.name} ({why})"
    pw = _pack_conv(gm, node)
    args = (x, _q(node, "x_scale"), _q(node, "x_zp"), pw, _q(node, "w_scale"), _q(node, "w_zp"),
            accum, b, list(stride), list(padding), list(dilation), groups, _q(node, "out_scale"),
            _q(node, "out_zp"), _out_dtype(node), _q(node, "other_scale"), _q(node, "other_zp"),
            "sum", 1.0, attr, sc, alg or "")
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(onednn.qconv2d_pointwise.binary, args)
    return _finish(gm, node, new, "onednn.qconv2d_pointwise.binary", note)


def _pack_linear(gm, node):
    return _packed(gm, node, onednn.qlinear_prepack(constant(gm, node.args[1]), None), "qlinear_w")


def lower_qlinear(gm, node):
    x, w, b = node.args[:3]
    attr, sc, alg = _unary_args(node, "qlinear")
    pw = _pack_linear(gm, node)
    args = (x, _q(node, "x_scale"), _q(node, "x_zp"), pw, _q(node, "w_scale"), _q(node, "w_zp"),
            b, _q(node, "out_scale"), _q(node, "out_zp"), _out_dtype(node), attr, sc, alg or "none")
    kernel = "tensor" if node.target is fp.qlinear_dynamic else "default"
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(getattr(onednn.qlinear_pointwise, kernel), args)
    return _finish(gm, node, new, "onednn.qlinear_pointwise" + (".tensor" if kernel == "tensor" else ""))


def lower_qlinear_binary(gm, node):
    x, w, b, other = node.args[:4]
    attr, sc, alg = _unary_args(node, "qlinear")
    why = alias.why_not_inplace(node, other, reads=(x, w, b))
    binop, note = ("sum", f"in place into {other.name} (dead after the op)") if why is None else (
        "add", f"out-of-place: {why}")
    pw = _pack_linear(gm, node)
    args = (x, _q(node, "x_scale"), _q(node, "x_zp"), pw, _q(node, "w_scale"), _q(node, "w_zp"),
            other, b, _q(node, "out_scale"), _q(node, "out_zp"), _out_dtype(node),
            _q(node, "other_scale"), _q(node, "other_zp"), binop, 1.0, attr, sc, alg or "none")
    kernel = "binary_tensor" if node.target is fp.qlinear_dynamic else "binary"
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(getattr(onednn.qlinear_pointwise, kernel), args)
    return _finish(gm, node, new, f"onednn.qlinear_pointwise.{kernel}", note)


UNARY, BINARY = [(), ("unary",)], [("binary",), ("binary", "unary")]
register("onednn", fp.qconv, UNARY, U8, qconv_check, lower_qconv, late_check=_layout_reason)
register("onednn", fp.qconv, BINARY, U8, qconv_binary_check, lower_qconv_binary,
         late_check=_layout_reason)
register("onednn", fp.qlinear, UNARY, U8, qlinear_check, lower_qlinear)
register("onednn", fp.qlinear, BINARY, U8, qlinear_binary_check, lower_qlinear_binary)
register("onednn", fp.qlinear_dynamic, UNARY, U8, qlinear_check, lower_qlinear)
register("onednn", fp.qlinear_dynamic, BINARY, U8, qlinear_binary_check, lower_qlinear_binary)
