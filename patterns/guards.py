"""Named, pure guards shared by pattern rows.

Each takes a Match and returns a reason to decline (shown in the report) or None.
They read only ``meta["val"]``, bound literals, user counts and dtypes — and, through
``Match.lowerable``, the lowering table's answer for the fused form a row would make.
"""
from __future__ import annotations

from fusepass.ops import KERNEL_DTYPES


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


def scalars_valid(post_op, new_chain):
    """The bound literals make valid scalars for the post-op (finite; min <= max)."""
    def guard(m):
        return post_op.check(new_chain(m.bindings)[1])
    guard.__name__ = f"scalars_valid[{post_op.name}]"
    return guard


def lowerable(new_chain, other_name="other"):
    """The chosen target has a kernel for the fused op this row would make (the lowering
    table answers through ``Match.lowerable``): fusing into a chain that then runs on the
    reference kernel is slower than not fusing. ``new_chain(bindings) -> (post, scalars)``
    is appended to the op's chain; a binary row's new operand is bound as ``other_name``."""
    def guard(m):
        post, scalars = new_chain(m.bindings)
        other = m.bindings.get(other_name)
        return m.lowerable(list(m["post"]) + post, list(m["scalars"]) + scalars, other)
    guard.__name__ = "lowerable"
    return guard


def conv_rank(n):
    def when(m):
        w = m.val("weight")
        return w is not None and w.dim() == n + 2 and not m["transposed"]
    when.__name__ = f"conv{n}d"
    return when
