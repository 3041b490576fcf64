"""FUSEPASS_CHECK=1 (or ``check=True``): run eager beside the optimized graph on the
first call of every variant and raise, naming the first diverging node, when outputs
differ beyond the dtype's tolerance. Off by default: it costs one eager run per variant.

Localization: in check mode lowering records, on each kernel node, the fused op it came
from and that op's operands (``meta["fusepass_fused"]``). On a divergence the optimized
graph is re-run by an interpreter that also evaluates each kernel's fused op (the ATen
reference) on the very same inputs, before the kernel runs (in-place kernels overwrite
an operand); the first kernel that disagrees is named. If every kernel agrees, the error
comes from a rewrite (a fold or a fusion), and the first differing output is named.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

# (rtol, atol) per dtype, against the output's scale; the test suite uses the same table
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2),
             torch.float16: (1e-2, 1e-2), torch.float64: (1e-9, 1e-9)}


class CheckError(AssertionError):
    pass


class Operand(str):
    """A recorded operand that is another node's value (by node name)."""


def record_fused(gm, node) -> tuple:
    """What a kernel node replaces: (fused op, operands), weights kept as tensors."""
    def resolve(a):
        return getattr(gm, a.target) if a.op == "get_attr" else Operand(a.name)
    return node.target, fx.node.map_arg(node.args, resolve)


def difference(got, want, compute_dtype=None) -> Optional[str]:
    """None when got matches want within the dtype's tolerance, else a description.
    ``compute_dtype``: the dtype the graph computed in when it is not the output's
    (``Options.precision="bf16"``: fp32 edges, bf16 inside), whose tolerance applies."""
    g_leaves, w_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(g_leaves) != len(w_leaves):
        return f"{len(g_leaves)} outputs, eager has {len(w_leaves)}"
    for i, (g, w) in enumerate(zip(g_leaves, w_leaves)):
        if not isinstance(w, torch.Tensor):
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i}: {tuple(g.shape)}/{g.dtype}, eager {tuple(w.shape)}/{w.dtype}"
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return f"output {i}: integer values differ"
            continue
        if w.numel() == 0:
            continue
        rtol, atol = TOLERANCE.get(compute_dtype or w.dtype, (1e-6, 1e-6))
        scale = max(w.abs().max().item(), 1.0)
        err = (g.double() - w.double()).abs().max().item()
        if not err <= atol * scale + rtol:  # also catches NaN
            return f"output {i}: max abs difference {err:.3g} (scale {scale:.3g}, {w.dtype})"
    return None


class _Localizer(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.culprit = None

    def run_node(self, n):
        fused = n.meta.get("fusepass_fused")
        if fused is None or self.culprit is not None:
            return super().run_node(n)
        target, args = fused
        args = pytree.tree_map(
            lambda a: self.env[self.by_name[a]] if isinstance(a, Operand) else a, args)
        want = target(*args)  # before the kernel: an in-place kernel overwrites `other`
        got = super().run_node(n)
        diff = difference(got, want)
        if diff:
            post = "+".join(args[-2]) or "no post-op"
            self.culprit = f"{n.name} ({n.target}, fused {target.__name__} with {post}): {diff}"
        return got


def check_variant(gm, user_args, out, want, compute_dtype=None):
    diff = difference(out, want, compute_dtype)
    if diff is None:
        return
    loc = _Localizer(gm)
    with torch.no_grad():
        loc.run(*user_args)
    where = (f"first diverging node: {loc.culprit}" if loc.culprit else
             "every kernel matches its fused op: a rewrite (fold or fusion) changed the "
             "result; see the report")
    raise CheckError(f"FUSEPASS_CHECK: optimized graph differs from eager ({diff}); {where}")
