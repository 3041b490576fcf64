"""Rows ``fold.*``: eval BatchNorm and per-channel constants folded into conv/linear weights.

Every fold is an affine map of the output channels, ``y' = a*y + d``, absorbed as
``W' = a*W`` (per output channel) and ``b' = a*b + d``:

    BatchNorm        a = gamma / sqrt(var + eps)      d = beta - mean * a
    y + alpha*c      a = 1                            d = alpha*c
    c + alpha*y      a = alpha                        d = c
    y - alpha*c      a = 1                            d = -alpha*c
    c - alpha*y      a = -alpha                       d = c        (sub(c, y), rsub)
    y * c, y / c     a = c, 1/c                       d = 0

A replacement spells the new weight and bias as ATen ops over the constants, in
float64 and cast back once (``_to_copy(W * a, dtype=W.dtype)``), so bf16/fp16 weights are
not folded in their own precision (pytorch#145623); a weight autocast cast down
(``_to_copy(W_fp32, dtype=bf16)``) is folded from the fp32 ``W`` behind the cast, rounded
once. Those expressions have constant inputs only; the rewrite engine evaluates them
into new constants as it replaces (``fusepass.rewrite.evaluate_constants``), so a user's
parameter is never written. Replacements may read the (static) ``meta["val"]`` of bound
nodes for shapes and dtypes.

Rows come from a product of families (conv: 1d/2d/3d, grouped, transposed; linear) and
spellings; ``fold.bn*`` rows belong to ``fold_batchnorm``, ``fold.const.*`` rows to
``fold_binary_constants``.
"""
from __future__ import annotations

import inspect
import itertools
import operator

import torch
import torch.fx as fx

from fusepass import ops as fp
from fusepass.patterns import fold_guards as F
from fusepass.patterns import guards as G
from fusepass.patterns.epilogues import CONV_ARGS, LINEAR_ARGS
from fusepass.patterns.table import Rule, with_signature

aten = torch.ops.aten
F64 = torch.float64

FAMILIES = {"conv": (fp.conv, CONV_ARGS), "linear": (fp.linear, LINEAR_ARGS)}


def _val(p):
    return p.node.meta["val"]


def _f64(t):
    return aten._to_copy.default(t, dtype=F64)


def _f64_source(p):
    """``p`` in float64, from the wider constant behind a down-cast when there is one:
    under autocast a weight reaches its conv as ``_to_copy(W_fp32, dtype=bf16)``, and a
    fold computed from the fp32 ``W`` is rounded to bf16 once, not twice."""
    if isinstance(p, fx.Proxy) and (cast := F.cast_of(p.node)) is not None:
        src = cast[0]
        v = src.meta.get("val") if isinstance(src, fx.Node) else None
        if (src.op == "get_attr" and v is not None and v.is_floating_point()
                and torch.finfo(v.dtype).bits > torch.finfo(_val(p).dtype).bits):
            return _f64(fx.Proxy(src, p.tracer))
    return _f64(p)


def _cast(t, like):
    return aten._to_copy.default(t, dtype=_val(like).dtype)


def _out_channels(family, w, base):
    shape = _val(w).shape
    if family == "conv" and base[6]:  # transposed: weight is [Cin, Cout/groups, *k]
        return shape[1] * base[8]
    return shape[0]


def _vec(c, w, cout):
    """A scalar or per-channel constant as a float64 [Cout] vector."""
    if isinstance(c, fx.Proxy):
        return aten.expand.default(aten.reshape.default(_f64(c), [-1]), [cout])
    return aten.new_full.default(w, [cout], float(c), dtype=F64)


def _scale_out(family, w64, a, w, base):
    """w64 * a along the output channels of the weight."""
    shape = list(_val(w).shape)
    if family == "conv" and base[6]:  # transposed, grouped: [g, Cin/g, Cout/g, *k]
        g = base[8]
        grouped = aten.reshape.default(w64, [g, shape[0] // g] + shape[1:])
        scaled = aten.mul.Tensor(grouped, aten.reshape.default(a, [g, 1, shape[1]] + [1] * (len(shape) - 2)))
        return aten.reshape.default(scaled, shape)
    return aten.mul.Tensor(w64, aten.reshape.default(a, [shape[0]] + [1] * (len(shape) - 1)))


def fold_affine(family, base, a, d):
    """The fused op with ``a*y + d`` folded in; a/d are f64 [Cout] vectors or None (1, 0)."""
    op, _ = FAMILIES[family]
    w, b = base[1], base[2]
    new = list(base)
    if a is not None:
        new[1] = _cast(_scale_out(family, _f64_source(w), a, w, base), w)
    b64 = None if b is None else _f64_source(b)
    if b64 is not None and a is not None:
        b64 = aten.mul.Tensor(b64, a)
    if d is not None:
        b64 = d if b64 is None else aten.add.Tensor(b64, d)
    if b64 is not None:
        new[2] = _cast(b64, b if b is not None else w)
    return op(*new)


# -- binary spellings: name -> (ATen fragment over y, (c, alpha) -> (a, d), guards, when, doc)
def _scaled(v, k, w, cout):
    return aten.mul.Tensor(_vec(v, w, cout), k)


def _conv_first(m):
    return m.anchor.args[0] is m.fused


BINARY = {
    "add": (lambda y, c, alpha: aten.add.Tensor(y, c, alpha=alpha),
            lambda c, al, w, n: (None, _scaled(c, al, w, n)), (),
            lambda m: _conv_first(m) or m["alpha"] == 1, "y + alpha*c, either order"),
    "add_alpha_rev": (lambda y, c, alpha: aten.add.Tensor(c, y, alpha=alpha),
                      lambda c, al, w, n: (_vec(al, w, n), _vec(c, w, n)), (),
                      lambda m: not _conv_first(m) and m["alpha"] != 1, "c + alpha*y"),
    "sub": (lambda y, c, alpha: aten.sub.Tensor(y, c, alpha=alpha),
            lambda c, al, w, n: (None, _scaled(c, -al, w, n)), (), None, "y - alpha*c"),
    "rsub": (lambda y, c, alpha: aten.sub.Tensor(c, y, alpha=alpha),
             lambda c, al, w, n: (_vec(-al, w, n), _vec(c, w, n)), (), None, "c - alpha*y"),
    "rsub_scalar": (lambda y, c, alpha: aten.rsub.Scalar(y, c, alpha=alpha),
                    lambda c, al, w, n: (_vec(-al, w, n), _vec(c, w, n)), (), None,
                    "rsub(y, c): c - alpha*y"),
    "rsub_tensor": (lambda y, c, alpha: aten.rsub.Tensor(y, c, alpha=alpha),
                    lambda c, al, w, n: (_vec(-al, w, n), _vec(c, w, n)), (), None,
                    "rsub(y, t): t - alpha*y"),
    "mul": (lambda y, c: aten.mul.Tensor(y, c),
            lambda c, al, w, n: (_vec(c, w, n), None), (), None, "y * c, either order"),
    "div": (lambda y, c: aten.div.Tensor(y, c),
            lambda c, al, w, n: (aten.reciprocal.default(_vec(c, w, n)), None),
            (F.nonzero_divisor,), None, "y / c"),
    "rdiv": (lambda y, c: aten.div.Tensor(c, y), None, (F.not_affine,), None,
             "c / y: never folds, reported"),
}
COMMON = (F.plain_op, F.float_result, F.weights_constant, F.per_channel,
          F.no_promotion, F.finite_constant)


def binary_row(family: str, spelling: str) -> Rule:
    op, base_names = FAMILIES[family]
    fragment, to_affine, extra, when, doc = BINARY[spelling]
    takes_alpha = "alpha" in inspect.signature(fragment).parameters
    names = base_names + ["c"] + (["alpha"] if takes_alpha else [])
    n = len(base_names)

    def pattern(*a):
        return fragment(op(*a[:n]), *a[n:])

    def replacement(*a):
        base, c, alpha = list(a[:n]), a[n], (a[n + 1] if takes_alpha else 1)
        w = base[1]
        av, dv = to_affine(c, alpha, w, _out_channels(family, w, base))
        return fold_affine(family, base, av, dv)

    guards = (F.not_affine,) if to_affine is None else COMMON + tuple(extra)

    def candidate(m):  # silent: a constant operand, in the spelling's operand order
        return F.constant_operand(m) and (when is None or when(m))

    candidate.__name__ = f"constant_operand[{spelling}]"
    return Rule(f"fold.const.{family}.{spelling}", with_signature(pattern, names),
                with_signature(replacement, names), G.all_of(*guards),
                f"{family}(x) then {doc} -> {family} with the constant in W and b", candidate)


# -- BatchNorm forms: name -> (ATen fragment over y returning the normalized output, params)
BN_FORMS = {
    "bn": (lambda y, bn_weight, bn_bias, mean, var, training, momentum, eps: operator.getitem(
        aten.native_batch_norm.default(y, bn_weight, bn_bias, mean, var, training, momentum, eps), 0),
        ["bn_weight", "bn_bias", "mean", "var", "training", "momentum", "eps"]),
    "bn_no_training": (lambda y, bn_weight, bn_bias, mean, var, momentum, eps: operator.getitem(
        aten._native_batch_norm_legit_no_training.default(y, bn_weight, bn_bias, mean, var,
                                                          momentum, eps), 0),
        ["bn_weight", "bn_bias", "mean", "var", "momentum", "eps"]),
}
BN_GUARDS = (F.plain_op, F.float_result, F.bn_eval, F.weights_constant, F.bn_constant,
             F.bn_channels, F.bn_finite, F.bn_layout)


def bn_row(family: str, form: str) -> Rule:
    op, base_names = FAMILIES[family]
    fragment, params = BN_FORMS[form]
    names = base_names + params
    n = len(base_names)

    def pattern(*a):
        return fragment(op(*a[:n]), *a[n:])

    def replacement(*a):
        base, bn = list(a[:n]), dict(zip(params, a[n:]))
        s = aten.rsqrt.default(aten.add.Tensor(_f64(bn["var"]), bn["eps"]))
        if bn["bn_weight"] is not None:
            s = aten.mul.Tensor(s, _f64(bn["bn_weight"]))
        d = aten.neg.default(aten.mul.Tensor(_f64(bn["mean"]), s))
        if bn["bn_bias"] is not None:
            d = aten.add.Tensor(d, _f64(bn["bn_bias"]))
        return fold_affine(family, base, s, d)

    return Rule(f"fold.{form}.{family}", with_signature(pattern, names), with_signature(replacement, names),
                G.all_of(*BN_GUARDS),
                f"{family}(x) then eval BatchNorm ({form}) -> {family} with W*s, (b-mean)*s+beta")


BN_ROWS = [bn_row(f, form) for form, f in itertools.product(BN_FORMS, FAMILIES)]
BINARY_ROWS = [binary_row(f, s) for f, s in itertools.product(FAMILIES, BINARY)]
ROWS = BN_ROWS + BINARY_ROWS
