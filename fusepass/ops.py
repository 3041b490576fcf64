"""The fusepass ops: the backend-neutral form of a fused conv/linear region.

Capture turns every convolution into ``fusepass::conv`` and every ``F.linear`` into
``fusepass::linear`` with an empty post-op chain; the fuse pass appends post-ops to the
chain; lowering maps (op, chain, dtype) to a kernel of the chosen target. Each op has a
fake kernel (shapes only) and a reference kernel in plain ATen, which is also what runs
when no target kernel exists for a chain.

A chain is a list of names applied in order to the conv/linear output ``y``:
binary names combine ``y`` with the op's ``other`` tensor (``y + other``, ...), unary
names take their scalar parameters, in order, from the flat ``scalars`` list.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fusepass.ir import cpu_pointwise_strides, with_strides
from fusepass.postops import REGISTRY

aten = torch.ops.aten

POST_OPS = REGISTRY  # name -> PostOp (fusepass/postops.py: one row per post-op)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what some target's fused kernels compute in


def split_chain(post: Sequence[str], scalars: Sequence[float]):
    """Yield (PostOp, its scalars) for a chain; raises ValueError on a malformed chain."""
    i = 0
    for name in post:
        if name not in POST_OPS:
            raise ValueError(f"unknown post-op {name!r}; known: {sorted(POST_OPS)}")
        op = POST_OPS[name]
        yield op, list(scalars[i : i + op.arity])
        i += op.arity
    if i != len(scalars):
        raise ValueError(f"chain {list(post)} takes {i} scalars, got {len(scalars)}")


def apply_chain(y, other, post, scalars):
    for op, s in split_chain(post, scalars):
        y = op.reference(y, other, *s)
    return y


def _fake_chain(y, other, post, scalars):
    """``apply_chain`` on fake tensors, each step given the strides eager's CPU kernel
    gives it (``ir.cpu_pointwise_strides``: the fake kernels differ on values that are
    contiguous and channels-last at once): the fused op's meta is eager's result."""
    for op, s in split_chain(post, scalars):
        new = op.reference(y, other, *s)
        want = cpu_pointwise_strides(op.aten, new, [y, other] if op.binary else [y])
        y = new if want is None or want == tuple(new.stride()) else with_strides(new, want)
    return y


def _conv(chain):
    def kernel(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
               other, post, scalars):
        y = aten.convolution.default(x, weight, bias, stride, padding, dilation, transposed,
                                     output_padding, groups)
        return chain(y, other, post, scalars)
    return kernel


def _linear(chain):
    def kernel(x, weight, bias, other, post, scalars):
        return chain(aten.linear.default(x, weight, bias), other, post, scalars)
    return kernel


# reference kernels (plain ATen) and fake kernels (the same, with eager's CPU strides)
conv_reference, linear_reference = _conv(apply_chain), _linear(apply_chain)
conv_fake, linear_fake = _conv(_fake_chain), _linear(_fake_chain)


_lib = torch.library.Library("fusepass", "DEF")
# The schemas, from their parts: a conv's or a linear's own arguments, then the post-op
# chain; the int8 forms append their quantization parameters (below).
_CONV_ARGS = ("Tensor x, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
              "SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups")
_LINEAR_ARGS = "Tensor x, Tensor weight, Tensor? bias"
_CHAIN_ARGS = "Tensor? other, str[] post, float[] scalars"
_QPARAM_ARGS = ("float x_scale, int x_zp, Tensor w_scale, Tensor w_zp, float out_scale, "
                "int out_zp, ScalarType? out_dtype, float other_scale, int other_zp")
_lib.define(f"conv({_CONV_ARGS}, {_CHAIN_ARGS}) -> Tensor")
_lib.define(f"linear({_LINEAR_ARGS}, {_CHAIN_ARGS}) -> Tensor")
# The reference kernels serve every backend key (CPU, Meta, fake): they are plain ATen.
_lib.impl("conv", conv_reference, "CompositeExplicitAutograd")
_lib.impl("linear", linear_reference, "CompositeExplicitAutograd")
torch.library.register_fake("fusepass::conv", conv_fake, lib=_lib)
torch.library.register_fake("fusepass::linear", linear_fake, lib=_lib)

conv = torch.ops.fusepass.conv.default
linear = torch.ops.fusepass.linear.default

# INT8: the quantized forms of the two fused ops (``patterns/quantized.py`` makes them of
# dequantize -> conv/linear -> [quantize]). ``x`` and ``weight`` are the quantized tensors
# (u8 activations, s8 weights with per-output-channel scales), the conv/linear arguments
# and the post-op chain sit where they sit in the float op, and the quantization
# parameters follow: the output is quantized with (out_scale, out_zp) to ``out_dtype``,
# or float32 when it is None; a quantized ``other`` (the residual of an int8-output
# conv) carries (other_scale, other_zp), a float one 1.0 and 0.
_lib.define(f"qconv({_CONV_ARGS}, {_CHAIN_ARGS}, {_QPARAM_ARGS}) -> Tensor")
_lib.define(f"qlinear({_LINEAR_ARGS}, {_CHAIN_ARGS}, {_QPARAM_ARGS}) -> Tensor")
# Dynamic quantization (``quantize(..., dynamic=True)``): the activation's scale and zero
# point are computed per call (``choose_qparams.tensor`` in the graph), so they are tensors.
_lib.define("qlinear.tensor({}, {}, {}) -> Tensor".format(
    _LINEAR_ARGS, _CHAIN_ARGS, _QPARAM_ARGS.replace("float x_scale, int x_zp",
                                                    "Tensor x_scale, Tensor x_zp")))
_qd = None


def quantized_decomposed():
    """``torch.ops.quantized_decomposed``, its definitions loaded (torch registers them in
    ``torch.ao.quantization.fx._decomposed``, which PT2E imports)."""
    global _qd
    if _qd is None:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
        _qd = torch.ops.quantized_decomposed
    return _qd


QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _dtype(t):
    """A tensor's dtype; for an FX proxy (``lowering.reference`` traces these kernels into
    the graph) its node's."""
    return t.node.meta["val"].dtype if isinstance(t, torch.fx.Proxy) else t.dtype


def _dq_x(x, scale, zp):
    dtype = _dtype(x)
    lo, hi = QRANGE[dtype]
    per_call = isinstance(scale, (torch.Tensor, torch.fx.Proxy))  # dynamic quantization
    op = quantized_decomposed().dequantize_per_tensor
    return (op.tensor if per_call else op.default)(x, scale, zp, lo, hi, dtype)


def _dq_w(w, scale, zp):
    return quantized_decomposed().dequantize_per_channel.default(w, scale, zp, 0, -128, 127,
                                                                 torch.int8)


def _requant(y, other, post, scalars, out_scale, out_zp, out_dtype, other_scale, other_zp):
    if other is not None and _dtype(other) in QRANGE:
        other = _dq_x(other, other_scale, other_zp)
    y = apply_chain(y, other, post, scalars)
    if out_dtype is None:
        return y
    lo, hi = QRANGE[out_dtype]
    return quantized_decomposed().quantize_per_tensor.default(y, out_scale, out_zp, lo, hi, out_dtype)


def qconv_reference(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                    other, post, scalars, x_scale, x_zp, w_scale, w_zp, out_scale, out_zp,
                    out_dtype, other_scale, other_zp):
    """The q/dq decomposition: what PT2E's converted graph computes."""
    y = aten.convolution.default(_dq_x(x, x_scale, x_zp), _dq_w(weight, w_scale, w_zp), bias,
                                 stride, padding, dilation, transposed, output_padding, groups)
    return _requant(y, other, post, scalars, out_scale, out_zp, out_dtype, other_scale, other_zp)


def qlinear_reference(x, weight, bias, other, post, scalars, x_scale, x_zp, w_scale, w_zp,
                      out_scale, out_zp, out_dtype, other_scale, other_zp):
    y = aten.linear.default(_dq_x(x, x_scale, x_zp), _dq_w(weight, w_scale, w_zp), bias)
    return _requant(y, other, post, scalars, out_scale, out_zp, out_dtype, other_scale, other_zp)


_lib.impl("qconv", qconv_reference, "CompositeExplicitAutograd")
_lib.impl("qlinear", qlinear_reference, "CompositeExplicitAutograd")
_lib.impl("qlinear.tensor", qlinear_reference, "CompositeExplicitAutograd")
torch.library.register_fake("fusepass::qconv", qconv_reference, lib=_lib)
torch.library.register_fake("fusepass::qlinear", qlinear_reference, lib=_lib)
torch.library.register_fake("fusepass::qlinear.tensor", qlinear_reference, lib=_lib)
qconv = torch.ops.fusepass.qconv.default
qlinear = torch.ops.fusepass.qlinear.default
qlinear_dynamic = torch.ops.fusepass.qlinear.tensor

FUSED_OPS = (conv, linear, qconv, qlinear, qlinear_dynamic)
CONV_OPS = (conv, qconv)
QUANTIZED_OPS = (qconv, qlinear, qlinear_dynamic)
REFERENCE = {conv: conv_reference, linear: linear_reference, qconv: qconv_reference,
             qlinear: qlinear_reference, qlinear_dynamic: qlinear_reference}


def _positions(op, names: str) -> dict:
    """Argument positions of ``op`` by name, read from its schema."""
    index = {a.name: i for i, a in enumerate(op._schema.arguments)}
    return {n.split()[-1]: index[n.split()[-1]] for n in names.split(", ")}


# Positions of the chain arguments, shared by passes that read or extend a chain.
CHAIN_ARGS = {op: tuple(_positions(op, _CHAIN_ARGS).values()) for op in FUSED_OPS}
# Positions of the quantization parameters of the int8 ops, by name.
QPARAMS = {op: _positions(op, _QPARAM_ARGS) for op in QUANTIZED_OPS}


def family_of(target) -> str:
    """The registry's family name of a fused op: conv, linear, qconv, qlinear (the op's
    name: both qlinear overloads are one family)."""
    if target not in FUSED_OPS:
        raise KeyError(target)
    return target.__name__.split(".")[0]


def chain_of(node) -> tuple:
    """(other, post, scalars) of a fusepass op node."""
    i, j, k = CHAIN_ARGS[node.target]
    return node.args[i], list(node.args[j]), list(node.args[k])
