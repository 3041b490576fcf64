"""Rows: PT2E's quantize/dequantize around a fused conv/linear -> one int8 op.

A PT2E-converted graph (torchao's ``convert_pt2e``, X86InductorQuantizer) spells an int8
conv as ``dequantize(x_u8) -> conv(., dequantize(w_s8)) -> [post-ops] -> [quantize]``.
The float rows (epilogues, binary) have fused the conv and its post-ops by the time these
rows run (the ``fuse_int8`` pass follows ``fuse``), so a row here only looks through the
quantization ops around a ``fusepass::conv``/``linear``:

  * ``int8.qconv2d`` / ``int8.qlinear``: dequantized u8 input and per-channel s8
    constant weight -> ``fusepass::qconv``/``qlinear`` (float output);
  * ``*.requant``: a ``quantize_per_tensor`` of that output -> the op's output quantized
    (oneDNN requantizes in its epilogue; a reduced quant range, 0..127, is a clamp after);
  * ``int8.qconv2d.qaccum``: an int8-output conv whose residual is ``dequantize(r_u8)``
    takes ``r_u8`` itself (oneDNN's sum post-op accumulates into the quantized tensor);
  * ``int8.qlinear.dynamic``: dynamic quantization (``choose_qparams`` per call, then
    ``quantize/dequantize_per_tensor.tensor``): the per-call scale and zero point are
    tensors, which ``fusepass::qlinear.tensor`` (oneDNN's ``qlinear_pointwise.tensor``)
    takes as they are; the activation's quantization stays in the graph, before it.

Guards carry what the kernels need (measured on torch 2.13): u8 activations (s8 raises),
s8 symmetric weights, per-channel along dim 0, positive finite scales, and — on CPUs
without VNNI — activations within 0..127: there oneDNN adds pairs of u8*s8 products in
int16, which saturates (relative error up to ~20 % measured on a 3x3 conv with full-range
input). Which post-op chains the int8 kernels take is the lowering table's answer.
"""
from __future__ import annotations

import functools
import math

import torch

from fusepass import ops as fp
from fusepass.ops import QRANGE, quantized_decomposed
from fusepass.patterns import guards as G
from fusepass.patterns.epilogues import CONV_ARGS, LINEAR_ARGS
from fusepass.patterns.table import Rule, with_signature

X = ["xq", "xs", "xzp", "xlo", "xhi", "xdt"]
W = ["wq", "ws", "wzp", "wax", "wlo", "whi", "wdt"]
QTAIL = ["x_scale", "x_zp", "w_scale", "w_zp", "out_scale", "out_zp", "out_dtype",
         "other_scale", "other_zp"]


@functools.cache
def vnni() -> bool:
    """VNNI (avx512_vnni, avx_vnni) or AMX: oneDNN's int8 dot products accumulate in int32."""
    cpu = torch.cpu
    probes = [getattr(cpu, n, None) for n in ("_is_vnni_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


NO_VNNI = ("CPU lacks VNNI (avx512_vnni/avx_vnni/amx): oneDNN's u8*s8 kernels add pairs of "
           "products in int16 there, which saturates for activations above 127; quantize "
           "with reduce_range=True (fusepass.quantize does on such CPUs)")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def q_activation(m):
    """The dequantized input is u8 (oneDNN's int8 conv/linear take no s8 source), its
    scale a positive finite number, its zero point in range; 0..127 without VNNI."""
    if m["xdt"] is not torch.uint8:
        return f"activation dtype {m['xdt']}: oneDNN's int8 kernels take uint8 activations"
    if not _positive(m["xs"]):
        return f"activation scale {m['xs']!r} is not a positive finite number"
    lo, hi = m["xlo"], m["xhi"]
    if not (0 <= lo <= m["xzp"] <= hi <= 255):
        return f"activation zero point {m['xzp']} / range ({lo}, {hi}) outside uint8"
    if hi > 127 and not vnni():
        return f"activation range ({lo}, {hi}): {NO_VNNI}"
    return None


def q_activation_dynamic(m):
    """``q_activation`` for a per-call scale and zero point (tensors computed in the
    graph: their values are checked by ``choose_qparams``, which keeps the scale >= eps)."""
    if m["xdt"] is not torch.uint8:
        return f"activation dtype {m['xdt']}: oneDNN's int8 kernels take uint8 activations"
    if not all(getattr(m[k], "op", None) in ("call_function", "get_attr") for k in ("xs", "xzp")):
        return "activation scale / zero point are not tensors of the graph"
    lo, hi = m["xlo"], m["xhi"]
    if not (0 <= lo <= hi <= 255):
        return f"activation range ({lo}, {hi}) outside uint8"
    if hi > 127 and not vnni():
        return f"activation range ({lo}, {hi}): {NO_VNNI}"
    return None


def q_weight(rank):
    """An s8 constant weight of the conv's/linear's rank, quantized per output channel
    (axis 0) with positive finite scales and zero zero points (oneDNN's weights are
    symmetric)."""
    def guard(m):
        wq, ws, wzp = m["wq"], m["ws"], m["wzp"]
        consts = [getattr(m.gm, n.target, None) if getattr(n, "op", None) == "get_attr" else None
                  for n in (wq, ws, wzp)]
        if any(c is None for c in consts):
            return "weight or its quantization parameters are not frozen constants"
        w, s, z = consts
        if m["wdt"] is not torch.int8 or w.dtype != torch.int8:
            return f"weight dtype {w.dtype}: the int8 kernels take int8 weights"
        if w.dim() != rank:
            return f"{w.dim()}-d weight: this row takes {rank}-d"
        if m["wax"] != 0:
            return f"weight quantized along axis {m['wax']}, not per output channel (0)"
        if (m["wlo"], m["whi"]) not in ((-128, 127), (-127, 127)):
            return f"weight quant range ({m['wlo']}, {m['whi']}) is not int8's"
        if s.dim() != 1 or s.numel() != w.shape[0] or not bool(torch.isfinite(s).all() and (s > 0).all()):
            return "weight scales are not positive finite numbers, one per output channel"
        if bool((z != 0).any()):
            return "asymmetric weight zero point: oneDNN's int8 weights are symmetric"
        return None
    guard.__name__ = "q_weight"
    return guard


def q_output(m):
    """``quantize_per_tensor`` to u8/s8 with a positive finite scale."""
    if m["odt"] not in (torch.uint8, torch.int8):
        return f"output dtype {m['odt']}: the int8 kernels requantize to uint8 or int8"
    if not _positive(m["os"]):
        return f"output scale {m['os']!r} is not a positive finite number"
    lo, hi = QRANGE[m["odt"]]
    if not (lo <= m["olo"] <= m["ozp"] <= m["ohi"] <= hi):
        return f"output zero point {m['ozp']} / range ({m['olo']}, {m['ohi']}) outside {m['odt']}"
    return None


def q_accum(m):
    """The residual is the quantized tensor the output is written into: same dtype."""
    if m["out_dtype"] is None:
        return "float output: the residual stays dequantized"
    if m["adt"] != m["out_dtype"]:
        return f"residual dtype {m['adt']} differs from the output's {m['out_dtype']}"
    if not _positive(m["as_"]):
        return f"residual scale {m['as_']!r} is not a positive finite number"
    if list(m["post"])[:1] != ["add"]:
        return "no sum post-op to accumulate the residual into"
    return None


def conv2d(m):
    """A 2-d, not transposed conv (oneDNN's int8 conv rows here are 2-d)."""
    w = m.val("wq")
    return w is not None and w.dim() == 4 and not m["transposed"]


def _qd():
    return quantized_decomposed()


def _quantize_row(family, op, qop, arg_names, rank, when, dynamic=False):
    """conv/linear(dequantize(x), dequantize(w)) -> qop (float output). ``dynamic``: the
    activation's dequantize is the ``.tensor`` one (per-call scale and zero point)."""
    names = X + W + arg_names[2:]

    def pattern(*a):
        dequantize = _qd().dequantize_per_tensor
        x = (dequantize.tensor if dynamic else dequantize.default)(*a[:6])
        w = _qd().dequantize_per_channel.default(*a[6:13])
        return op(x, w, *a[13:])

    def replacement(*a):
        b = dict(zip(names, a))
        rest = [b[k] for k in arg_names[2:]]
        return qop(b["xq"], b["wq"], *rest, b["xs"], b["xzp"], b["ws"], b["wzp"], 1.0, 0, None,
                   1.0, 0)

    guards = [q_activation_dynamic if dynamic else q_activation, q_weight(rank),
              G.lowerable(lambda m: ([], []))]
    name = f"int8.q{family}" + (".dynamic" if dynamic else "")
    return Rule(name, with_signature(pattern, names), with_signature(replacement, names),
                G.all_of(*guards), f"dequantize{'.tensor' if dynamic else ''}(x_u8) -> "
                f"{family}(., dequantize(w_s8)) -> {qop.name()}", when)


def _accum(other, out_dtype):
    """The residual a quantized output will accumulate into: a ``dequantize`` of a tensor
    of the output's dtype is taken by ``*.qaccum`` next, so the kernel sees its input."""
    if (getattr(other, "op", None) == "call_function"
            and other.target is _qd().dequantize_per_tensor.default
            and len(other.users) == 1 and other.args[5] == out_dtype):
        return other.args[0]
    return other


def _requant_row(family, qop, arg_names):
    """quantize(qop(...)) -> qop with a quantized output."""
    base = arg_names + QTAIL[:4] + ["other_scale", "other_zp"]
    names = base + ["os", "ozp", "olo", "ohi", "odt"]
    nb = len(arg_names) + 4

    def pattern(*a):
        y = qop(*a[:nb], 1.0, 0, None, *a[nb:nb + 2])
        return _qd().quantize_per_tensor.default(y, *a[nb + 2:])

    def replacement(*a):
        b = dict(zip(names, a))
        y = qop(*a[:nb], b["os"], b["ozp"], b["odt"], b["other_scale"], b["other_zp"])
        if (b["olo"], b["ohi"]) != QRANGE[b["odt"]]:  # reduced range: the kernel saturates
            y = torch.ops.aten.clamp.default(y, b["olo"], b["ohi"])  # to the dtype's
        return y

    def lowerable(m):
        return m.lowerable(list(m["post"]), list(m["scalars"]), _accum(m["other"], m["odt"]))
    lowerable.__name__ = "lowerable"
    return Rule(f"int8.q{family}.requant", with_signature(pattern, names),
                with_signature(replacement, names), G.all_of(q_output, lowerable),
                f"quantize(q{family}(...)) -> its output requantized by the kernel")


def _qaccum_row(family, qop, arg_names):
    """qop(..., other=dequantize(r), int8 output) -> qop(..., other=r, r's qparams)."""
    i_other = arg_names.index("other")
    pre, post_names = arg_names[:i_other], arg_names[i_other + 1:]
    names = pre + ["aq", "as_", "azp", "alo", "ahi", "adt"] + post_names + QTAIL[:7]

    def pattern(*a):
        b = dict(zip(names, a))
        other = _qd().dequantize_per_tensor.default(*(b[k] for k in ("aq", "as_", "azp", "alo", "ahi", "adt")))
        return qop(*(b[k] for k in pre), other, *(b[k] for k in post_names),
                   *(b[k] for k in QTAIL[:7]), 1.0, 0)

    def replacement(*a):
        b = dict(zip(names, a))
        return qop(*(b[k] for k in pre), b["aq"], *(b[k] for k in post_names),
                   *(b[k] for k in QTAIL[:7]), b["as_"], b["azp"])

    def lowerable(m):
        return m.lowerable(list(m["post"]), list(m["scalars"]), m["aq"])
    lowerable.__name__ = "lowerable"
    return Rule(f"int8.q{family}.qaccum", with_signature(pattern, names),
                with_signature(replacement, names), G.all_of(q_accum, lowerable),
                f"int8-output q{family} + dequantize(r): accumulates into r itself")


ROWS = [
    _quantize_row("conv2d", fp.conv, fp.qconv, CONV_ARGS, 4, conv2d),
    _requant_row("conv2d", fp.qconv, CONV_ARGS),
    _qaccum_row("conv2d", fp.qconv, CONV_ARGS),
    _quantize_row("linear", fp.linear, fp.qlinear, LINEAR_ARGS, 2, None),
    _requant_row("linear", fp.qlinear, LINEAR_ARGS),
    _quantize_row("linear", fp.linear, fp.qlinear_dynamic, LINEAR_ARGS, 2, None, dynamic=True),
]
