"""Named, pure guards shared by pattern rows.

Each takes a Match and returns a reason to decline (shown in the report) or None.
They read only ``meta["val"]``, bound literals, user counts and dtypes.
"""
from __future__ import annotations

import math

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# What one oneDNN primitive can carry after a conv/linear: at most one binary post-op,
# then at most one eltwise; the kernels of both targets take this shape of chain.
UNARY_AFTER_BINARY = {"conv": {"relu"}, "linear": set()}


def all_of(*guards):
    def guard(m):
        for g in guards:
            reason = g(m)
            if reason:
                return reason
        return None
    guard.__name__ = "all_of(" + ", ".join(g.__name__ for g in guards) + ")"
    return guard


def kernel_dtype(m):
    """Input and weight are fp32 or bf16, and the same dtype."""
    x, w = m.val("x"), m.val("weight")
    if x is None or w is None:
        return "no meta['val'] on the operands"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} has no oneDNN kernel"
    if w.dtype != x.dtype:
        return f"dtype promotion: input {x.dtype}, weight {w.dtype}"
    return None


def weight_is_constant(m):
    w = m["weight"]
    return None if getattr(w, "op", None) == "get_attr" else "weight is not a frozen constant"


def unary_chain(family):
    """The chain so far accepts one more eltwise post-op."""
    def guard(m):
        post = list(m["post"])
        if not post:
            return None
        if len(post) == 1 and post[0] in ("add", "sub", "mul", "div"):
            return None  # binary then unary: checked per unary below
        return f"chain {post} already ends in an eltwise post-op"
    guard.__name__ = f"unary_chain[{family}]"
    return guard


def after_binary_allowed(family, unary):
    def guard(m):
        post = list(m["post"])
        if post and unary not in UNARY_AFTER_BINARY[family]:
            return f"no {family} kernel for {post[0]}+{unary}"
        return None
    guard.__name__ = f"after_binary_allowed[{family},{unary}]"
    return guard


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def hardtanh_bounds(m):
    lo, hi = m["e0"], m["e1"]
    if lo is None or hi is None:
        return "clamp without both bounds"
    if not _finite(lo, hi) or lo > hi:
        return f"bounds ({lo}, {hi}) are not finite with min <= max"
    return None


def finite_scalars(m):
    extras = [v for k, v in m.bindings.items() if k.startswith("e")]
    return None if _finite(*extras) else f"post-op parameters {extras} are not finite numbers"


def gelu_approximate(m):
    return None if m["e0"] in ("none", "tanh") else f"gelu approximate={m['e0']!r}"


def conv_rank(n):
    def when(m):
        w = m.val("weight")
        return w is not None and w.dim() == n + 2 and not m["transposed"]
    when.__name__ = f"conv{n}d"
    return when
