"""The post-op registry: one row per post-op a fused conv/linear can carry.

Everything that knows about a post-op reads its row here, so a new eltwise post-op is
one row plus its tests:
  * the fused ops' reference kernels (``ops.apply_chain``: ``PostOp.reference``);
  * the epilogue and binary pattern rows (``patterns/epilogues.py``, ``binary.py``: one
    row per family and ``Spelling``, for the families some target has a kernel for);
  * the lowering tables (``lowering/onednn.py``, ``lowering/ipex.py``: ``kernels``);
  * ``inplace_pointwise`` (``aten`` -> ``inplace``, ``inplace_operands``);
  * the layout rules (``layout_tolerant``: the ATen op computes the same values in any
    memory format and keeps its input's).

A ``Kernel`` says how one target spells the post-op: its attr (oneDNN's
``fusion_unary_attr_map`` name, IPEX's run-op infix), algorithm, which families take it,
and where it may sit relative to the one binary post-op a kernel carries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

aten = torch.ops.aten
BOTH = frozenset({"conv", "linear"})
CONV = frozenset({"conv"})
NONE = frozenset()
# the int8 ops' families (fusepass::qconv / qlinear), measured on torch 2.13: oneDNN's
# qconv_pointwise takes relu, hardtanh, hardswish, swish and the sum (add) post-op with
# relu after it; qlinear_pointwise also gelu, tanh and leaky_relu, not sigmoid
QCONV, QLINEAR = frozenset({"qconv"}), frozenset({"qlinear"})
QBOTH = QCONV | QLINEAR


@dataclass(frozen=True)
class Kernel:
    attr: str
    algorithm: Optional[str] = None
    families: frozenset = BOTH  # which fused ops' kernels take it
    after_binary: frozenset = NONE  # families where it may follow the binary post-op
    before_binary: frozenset = NONE  # families where the binary post-op may follow it
    # (chain scalars) -> the kernel's scalars, or a reason it cannot take them
    scalars: Callable[[list], list | str] = list


@dataclass(frozen=True)
class Spelling:
    """An ATen fragment over the conv/linear output ``y`` that means this post-op."""
    name: str  # the pattern row's suffix: "conv2d.<name>"
    fragment: Callable  # (y, e0, e1, ...) -> ATen
    n_extra: int = 0  # bound literals e0.. of the fragment
    scalars: Callable = lambda *e: []  # (e0, ...) -> the post-op's scalars
    comment: str = ""


@dataclass(frozen=True)
class PostOp:
    name: str
    arity: int  # how many entries of the chain's flat `scalars` it consumes
    binary: bool
    reference: Callable  # (y, other_or_None, *scalars) -> tensor, plain ATen
    aten: Optional[object] = None  # the functional ATen op it stands for
    inplace: Optional[object] = None  # its in-place twin (inplace_pointwise)
    inplace_operands: tuple = (0,)  # operands the in-place twin may write into
    spellings: tuple = ()
    kernels: dict = field(default_factory=dict)  # target name -> Kernel
    layout_tolerant: bool = True
    check: Callable[[list], Optional[str]] = lambda s: None  # the scalars are valid

    def kernel(self, target: str, family: str) -> Optional[Kernel]:
        k = self.kernels.get(target)
        return k if k is not None and family in k.families else None


def _finite(s):
    bad = [x for x in s if not (isinstance(x, (int, float)) and math.isfinite(x))]
    return f"post-op parameters {s} are not finite numbers" if bad else None


def _bounds(s):
    """hardtanh's bounds: numbers, min <= max; one may be infinite (a one-sided clamp is
    hardtanh(min, inf): oneDNN's and IPEX's kernels take it, measured on torch 2.13 / 2.8)."""
    bad = [x for x in s if not isinstance(x, (int, float)) or math.isnan(x)]
    if bad:
        return f"post-op parameters {s} are not numbers"
    return f"bounds {tuple(s)} have min > max" if s[0] > s[1] else None


def _one_sided(lo, hi):
    """clamp(y, min=None or max=None): the missing bound is infinite."""
    return [-math.inf if lo is None else lo, math.inf if hi is None else hi]


def _ipex_elu(s):
    alpha, scale, input_scale = s
    if scale != 1.0 or input_scale != 1.0:
        return (f"IPEX's elu ignores scale and input_scale (measured): elu(alpha={alpha}, "
                f"scale={scale}, input_scale={input_scale}) would be computed as elu(alpha)")
    return [alpha, 1.0, 1.0]


def _unary(name, op, inplace, spellings, onednn=None, ipex=None, arity=0, check=None,
           reference=None):
    kernels = {t: k for t, k in (("onednn", onednn), ("ipex", ipex)) if k is not None}
    ref = reference or (lambda y, other, *s: op(y, *s))
    return PostOp(name, arity, False, ref, op, inplace, (0,), tuple(spellings), kernels,
                  True, check or (lambda s: None))


def _s(name, fragment, comment, n_extra=0, scalars=lambda *e: []):
    return Spelling(name, fragment, n_extra, scalars, comment)


REGISTRY: dict[str, PostOp] = {p.name: p for p in [
    _unary("relu", aten.relu.default, aten.relu_.default,
           [_s("relu", lambda y: aten.relu.default(y), "relu(y)")],
           # after the binary post-op: oneDNN's conv binary kernels take relu (not its
           # linear ones); IPEX has *_add_relu_run for both
           onednn=Kernel("relu", families=BOTH | QBOTH, after_binary=CONV | QBOTH),
           ipex=Kernel("relu", after_binary=BOTH)),
    _unary("silu", aten.silu.default, aten.silu_.default,
           [_s("silu", lambda y: aten.silu.default(y), "silu(y)"),
            _s("silu_mul", lambda y: aten.mul.Tensor(y, aten.sigmoid.default(y)),
               "y*sigmoid(y), either order")],
           onednn=Kernel("swish", families=BOTH | QBOTH), ipex=Kernel("swish", before_binary=CONV)),
    _unary("sigmoid", aten.sigmoid.default, aten.sigmoid_.default,
           [_s("sigmoid", lambda y: aten.sigmoid.default(y), "sigmoid(y)")],
           onednn=Kernel("sigmoid"), ipex=Kernel("sigmoid")),
    _unary("tanh", aten.tanh.default, aten.tanh_.default,
           [_s("tanh", lambda y: aten.tanh.default(y), "tanh(y)")],
           onednn=Kernel("tanh", families=BOTH | QLINEAR), ipex=Kernel("tanh")),
    _unary("gelu", aten.gelu.default, aten.gelu_.default,
           [_s("gelu", lambda y: aten.gelu.default(y), "gelu(y), erf")],
           onednn=Kernel("gelu", "none", families=BOTH | QLINEAR), ipex=Kernel("gelu", scalars=lambda s: ["none"])),
    _unary("gelu_tanh", aten.gelu.default, aten.gelu_.default,
           [_s("gelu_tanh", lambda y: aten.gelu.default(y, approximate="tanh"),
               "gelu(y, approximate='tanh')")],
           onednn=Kernel("gelu", "tanh", families=BOTH | QLINEAR), ipex=Kernel("gelu", scalars=lambda s: ["tanh"]),
           reference=lambda y, other: aten.gelu.default(y, approximate="tanh")),
    _unary("hardtanh", aten.hardtanh.default, aten.hardtanh_.default,
           [_s("hardtanh", lambda y, e0, e1: aten.hardtanh.default(y, e0, e1),
               "hardtanh/relu6(y)", 2, lambda e0, e1: [e0, e1]),
            _s("clamp", lambda y, e0, e1: aten.clamp.default(y, e0, e1),
               "clamp(y, min, max), either bound may be None", 2, _one_sided),
            _s("clamp_min", lambda y, e0: aten.clamp_min.default(y, e0), "clamp_min(y, min)",
               1, lambda e0: _one_sided(e0, None)),
            _s("clamp_max", lambda y, e0: aten.clamp_max.default(y, e0), "clamp_max(y, max)",
               1, lambda e0: _one_sided(None, e0))],
           onednn=Kernel("hardtanh", families=BOTH | QBOTH), ipex=Kernel("hardtanh"), arity=2, check=_bounds),
    _unary("leaky_relu", aten.leaky_relu.default, aten.leaky_relu_.default,
           [_s("leaky_relu", lambda y, e0: aten.leaky_relu.default(y, e0), "leaky_relu(y)", 1,
               lambda e0: [e0])],
           onednn=Kernel("leaky_relu", families=BOTH | QLINEAR), ipex=Kernel("leaky_relu"), arity=1, check=_finite),
    # oneDNN's fusion_unary_attr_map has no elu ("Fusion behavior undefined", torch 2.13)
    _unary("elu", aten.elu.default, aten.elu_.default,
           [_s("elu", lambda y, e0, e1, e2: aten.elu.default(y, e0, e1, e2), "elu(y)", 3,
               lambda e0, e1, e2: [e0, e1, e2])],
           ipex=Kernel("elu", scalars=_ipex_elu), arity=3, check=_finite),
    _unary("hardswish", aten.hardswish.default, aten.hardswish_.default,
           [_s("hardswish", lambda y: aten.hardswish.default(y), "hardswish(y)")],
           onednn=Kernel("hardswish", families=BOTH | QBOTH), ipex=Kernel("hardswish")),
    _unary("hardsigmoid", aten.hardsigmoid.default, aten.hardsigmoid_.default,
           [_s("hardsigmoid", lambda y: aten.hardsigmoid.default(y), "hardsigmoid(y)")],
           onednn=Kernel("hardsigmoid"), ipex=Kernel("hardsigmoid")),
    # binary post-ops: y (op) other, other of the output's full shape. IPEX accumulates
    # post(y + alpha * other): sub is alpha = -1 (Kernel.scalars gives alpha)
    PostOp("add", 0, True, lambda y, o: aten.add.Tensor(y, o), aten.add.Tensor,
           aten.add_.Tensor, (0, 1),
           kernels={"onednn": Kernel("add", families=BOTH | QBOTH),
                    "ipex": Kernel("add", scalars=lambda s: [1.0])}),
    PostOp("sub", 0, True, lambda y, o: aten.sub.Tensor(y, o), aten.sub.Tensor,
           aten.sub_.Tensor, kernels={"onednn": Kernel("sub"),
                                       "ipex": Kernel("add", scalars=lambda s: [-1.0])}),
    PostOp("mul", 0, True, lambda y, o: aten.mul.Tensor(y, o), aten.mul.Tensor,
           aten.mul_.Tensor, (0, 1),
           kernels={"onednn": Kernel("mul"), "ipex": Kernel("mul", families=frozenset({"linear"}))}),
    PostOp("div", 0, True, lambda y, o: aten.div.Tensor(y, o), aten.div.Tensor,
           aten.div_.Tensor, kernels={"onednn": Kernel("div", families=CONV)}),
]}
UNARY = {n: p for n, p in REGISTRY.items() if not p.binary}
BINARY = {n: p for n, p in REGISTRY.items() if p.binary}
TARGETS_WITH_KERNELS = ("onednn", "ipex")


def has_kernel(name: str, family: str) -> bool:
    """Some target has a kernel for this post-op on this family: a pattern row is made."""
    return any(REGISTRY[name].kernel(t, family) for t in TARGETS_WITH_KERNELS)


def spelled(family: str):
    """(post-op, spelling) pairs of the eltwise post-ops some target fuses into ``family``."""
    return [(p, s) for p in UNARY.values() if has_kernel(p.name, family) for s in p.spellings]
