"""Rows: ops that run on the int8 tensor itself between int8 kernels (``int8.<op>``).

X86InductorQuantizer shares one observer between the input and the output of max/avg
pooling, flatten and cat (``SharedQuantizationSpec``; for cat every input's too), so a
converted graph spells them ``quantize(op(dequantize(x)), same scale/zero point)``.
Without these rows that sandwich runs in float: a dequantize of the whole input, the op,
a quantize of the whole output. With them the op reads and writes the u8/s8 tensor:

  * max pooling, view, permute move or select values: they commute with the monotone
    affine dequantize exactly (``_passthrough_row``);
  * cat moves values too: ``quantize(cat(dequantize(x_i, p_i)), p)`` is
    ``cat(quantize(dequantize(x_i, p_i), p))`` element for element, so an input whose
    parameters ``p_i`` are the output's ``p`` is taken as it is and any other one is
    requantized to ``p`` on its own (exact either way); with no input sharing ``p`` the
    row declines (nothing would be saved). Inductor's ``_register_quantization_cat``
    takes only the all-shared case. One row per input count (``CAT_ARITIES``): the
    engine matches lists of a fixed length;
  * average pooling (``avg_pool2d``; ``adaptive_avg_pool2d`` to 1x1, which capture spells
    ``mean.dim`` over H and W) rounds an average, see ``_pool_exact``.
"""
from __future__ import annotations

import torch

from fusepass.ops import QRANGE, quantized_decomposed
from fusepass.patterns.table import Rule, with_signature

aten = torch.ops.aten
QP, QP2 = ["s", "z", "lo", "hi", "dt"], ["s2", "z2", "lo2", "hi2", "dt2"]
CAT_ARITIES = range(2, 33)  # DenseNet-169's widest cat has 33 inputs: it stays float
# the largest window whose rounded average is provably the graph's (see _pool_exact)
MAX_WINDOW = 121


def _qd():
    return quantized_decomposed()


def same_qparams(dtypes):
    """The quantize after the op restores exactly the dequantize's parameters (the
    quantizer shared them: X86InductorQuantizer does for pooling and views), of a dtype
    the int8 op takes."""
    def guard(m):
        a = [m[k] for k in QP]
        b = [m[k] for k in QP2]
        if a != b:
            return f"quantize parameters {b} differ from the dequantize's {a}"
        if m["dt"] not in dtypes:
            return f"dtype {m['dt']}: the int8 op takes {', '.join(map(str, dtypes))}"
        return None
    guard.__name__ = "same_qparams"
    return guard


def _passthrough_row(name, op, arg_names, getitem=False, int8_op=None, dtypes=tuple(QRANGE),
                     guard=None, comment=None):
    """quantize(op(dequantize(x)), same qparams) -> op(x): ``op`` moves or selects values
    (max pooling, views), so it commutes with the monotone affine dequantize exactly.
    ``int8_op(x, z, *args)`` is what computes it on the int8 tensor, when ``op`` itself
    cannot; ``guard`` adds conditions to the shared parameters."""
    names = ["x"] + QP + arg_names + QP2
    k = len(arg_names)

    def apply(x, rest):
        y = op(x, *rest)
        return y[0] if getitem else y

    def pattern(*a):
        x = _qd().dequantize_per_tensor.default(*a[:6])
        return _qd().quantize_per_tensor.default(apply(x, a[6:6 + k]), *a[6 + k:])

    def replacement(*a):
        return int8_op(a[0], a[2], *a[6:6 + k]) if int8_op else apply(a[0], a[6:6 + k])

    shared = same_qparams(dtypes)
    full = shared if guard is None else (lambda m: shared(m) or guard(m))
    full.__name__ = shared.__name__ if guard is None else f"same_qparams+{guard.__name__}"
    return Rule(f"int8.{name}", with_signature(pattern, names), with_signature(replacement, names),
                full, comment or f"quantize({name}(dequantize(x))) -> {name} on the int8 tensor")


# ------------------------------------------------------------------ cat
def _cat_row(n):
    """quantize(cat([dequantize(x_i) for i < n], dim)) -> cat of the int8 tensors, those
    with other parameters than the output's requantized to it first."""
    ins = [[f"{k}_{i}" for k in ["x"] + QP] for i in range(n)]
    names = [a for i in ins for a in i] + ["dim"] + QP2

    def pattern(*a):
        xs = [_qd().dequantize_per_tensor.default(*a[6 * i:6 * i + 6]) for i in range(n)]
        return _qd().quantize_per_tensor.default(aten.cat.default(xs, a[6 * n]), *a[6 * n + 1:])

    def replacement(*a):
        out = list(a[6 * n + 1:])
        xs = [a[6 * i] if list(a[6 * i + 1:6 * i + 6]) == out else
              _qd().quantize_per_tensor.default(
                  _qd().dequantize_per_tensor.default(*a[6 * i:6 * i + 6]), *out)
              for i in range(n)]
        return aten.cat.default(xs, a[6 * n])

    def shares_qparams(m):
        """Some input has the output's parameters (else every input would be requantized:
        nothing saved), and the output is u8/s8."""
        out = [m[k] for k in QP2]
        if out[4] not in QRANGE:
            return f"output dtype {out[4]}: int8 cat takes uint8/int8"
        ps = [[m[f"{k}_{i}"] for k in QP] for i in range(n)]
        if out not in ps:
            return (f"no input's quantize parameters are the output's {out} (inputs: {ps}): "
                    "every input would be requantized, nothing saved")
        return None

    return Rule(f"int8.cat{n}", with_signature(pattern, names), with_signature(replacement, names),
                shares_qparams, f"quantize(cat({n} dequantized)) -> cat of the int8 tensors")


# ------------------------------------------------------------------ average pooling
def _pool_exact(count, what):
    """Why the rounded int8 average of ``count`` values may not be the graph's, or None.

    The graph computes ``q = round(mean((x - z) * s) / s) + z`` in fp32; in exact
    arithmetic that is ``round(S / N)`` (S the window's integer sum, N its count: z is an
    integer and cancels). With N odd, S / N is never a tie: it lies at least 1/(2N) from
    k + 1/2. The graph's fp32 error, in steps of s, is at most (N + 3) * 255 * eps
    (summation, the division, the multiply by 1/s), below 1/(2N) for N <= 121 (11x11):
    so the graph's q is exactly round(S / N), which the int8 rows compute (bit-identical;
    measured exhaustively over every window sum in tests/test_int8.py). With N even, S / N
    hits ties (S = N/2 mod N: a quarter of 2x2 windows), which the graph decides by fp32
    noise; no integer rounding follows that (measured on 2x2 windows: ATen's quantized
    avg_pool2d differs from the graph at 11.6 % of outputs, round-half-even of
    mean(x) - z at 4.9 %, one step each), while Inductor-int8 runs the float graph's own
    ops and matches it bit for bit: an even window stays float, said so."""
    if count % 2 == 0:
        return (f"{what} averages {count} values (even): its rounding ties are decided by the "
                "float graph's rounding, which the int8 average would not follow (one step "
                "off at ~5-12 % of outputs on 2x2 windows, measured); runs in float")
    if count > MAX_WINDOW:
        return (f"{what} averages {count} values: bit-identity with the float graph is "
                f"proven up to {MAX_WINDOW}; runs in float")
    return None


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * 2 if len(v) == 1 else v


def avg_window(m):
    """avg_pool2d whose every window averages the same odd count (no partial windows:
    no ceil_mode, no divisor override, padding counted or absent), small enough to be
    exact (``_pool_exact``)."""
    if m["ceil"] or m["div"] is not None:
        return "ceil_mode or divisor_override: windows of differing counts"
    if any(_pair(m["p"])) and not m["cip"]:
        return "padding not counted (count_include_pad=False): border windows of other counts"
    kh, kw = _pair(m["k"])
    return _pool_exact(kh * kw, f"a {kh}x{kw} window")


def global_mean(m):
    """mean over exactly H and W of a 4-D tensor (adaptive_avg_pool2d to 1x1), no dtype
    change, of an odd count small enough to be exact."""
    x = m.val("x")
    dims = {d % 4 for d in (m["dims"] or ())} if x is not None and x.dim() == 4 else None
    if dims != {2, 3} or m["mdt"] is not None:
        return "mean is not over H and W of a 4-d tensor"
    return _pool_exact(x.shape[2] * x.shape[3], f"a {x.shape[2]}x{x.shape[3]} global pool")


def _avg_pool_int8(x, z, k, st, p, ceil, cip, div):
    """round(avg_pool2d(x - z)) + z on the int8 values (the float average of integers;
    z shifts only where padding is counted: the graph pads with 0.0, the value z)."""
    shift = z if any(_pair(p)) else 0
    y = aten._to_copy.default(x, dtype=torch.float32)
    if shift:
        y = aten.sub.Tensor(y, shift)
    y = aten.round.default(aten.avg_pool2d.default(y, k, st, p, ceil, cip, div))
    if shift:
        y = aten.add.Tensor(y, shift)
    return aten._to_copy.default(y, dtype=x.node.meta["val"].dtype)


def _mean_int8(x, z, dims, keepdim, mdt):
    """round(S / N) in integers: (2 S + N) // 2N (no ties: N odd), S an int32 sum of the
    int8 tensor: it reads the int8 tensor once and never makes it float."""
    v = x.node.meta["val"]
    n = v.shape[2] * v.shape[3]
    s = aten.sum.dim_IntList(x, dims, keepdim, dtype=torch.int32)
    y = aten.div.Scalar_mode(aten.add.Scalar(aten.mul.Scalar(s, 2), n), 2 * n,
                             rounding_mode="floor")
    return aten._to_copy.default(y, dtype=v.dtype)


def _mean(x, dims, keepdim, mdt):
    return aten.mean.dim(x, dims, keepdim, dtype=mdt)


def _mean_restrided(x, dims, keepdim, mdt, size, stride, off):
    """adaptive_avg_pool2d(1) of a channels-last tensor: capture's decomposition restores
    the size-1 dims' strides with an ``as_strided`` view after the mean."""
    return aten.as_strided.default(_mean(x, dims, keepdim, mdt), size, stride, off)


def _mean_restrided_int8(x, z, dims, keepdim, mdt, size, stride, off):
    """Without the view: the quantize after it did not keep those strides either (eager's
    quantize of a [N, C, 1, 1] view strided (C, 1, C, C) is strided (C, 1, 1, 1), as the
    integer sum's result is)."""
    return _mean_int8(x, z, dims, keepdim, mdt)


ROWS = [
    # ATen's max_pool2d on a channels-last uint8 tensor with C*H*W > 255 raises (its index
    # type is the input's); the quantized engine's takes plain u8 tensors in any layout
    _passthrough_row("max_pool2d", aten.max_pool2d_with_indices.default,
                     ["k", "st", "p", "d", "ceil"], getitem=True,
                     int8_op=lambda x, z, *a: torch.ops.quantized.max_pool2d.default(x, *a),
                     dtypes=(torch.uint8,)),
    # flatten/reshape reach the IR as view (capture decomposes them)
    _passthrough_row("view", aten.view.default, ["size"]),
    _passthrough_row("permute", aten.permute.default, ["dims"]),
    _passthrough_row("avg_pool2d", aten.avg_pool2d.default, ["k", "st", "p", "ceil", "cip", "div"],
                     int8_op=_avg_pool_int8, guard=avg_window,
                     comment="quantize(avg_pool2d(dequantize(x))) -> round(avg_pool2d(x)), odd windows"),
    _passthrough_row("mean", _mean, ["dims", "keepdim", "mdt"], int8_op=_mean_int8, guard=global_mean,
                     comment="quantize(mean_HW(dequantize(x))) -> (2 sum(x) + N) // 2N, N odd"),
    _passthrough_row("mean.restrided", _mean_restrided,
                     ["dims", "keepdim", "mdt", "size", "stride", "off"],
                     int8_op=_mean_restrided_int8, guard=global_mean,
                     comment="the same, channels-last: as_strided after the mean"),
] + [_cat_row(n) for n in CAT_ARITIES]  # quantize(cat(dequantized)) -> cat of int8
