"""Write elementwise results into a dead operand's buffer instead of a new one.

Why: EfficientNet's squeeze-excite gate ``y = x * sigmoid(s)`` (x: [8, 96, 112, 112] at
batch 8) allocates a fresh 38 MB tensor per block and call; large blocks come from mmap,
so every call page-faults and zero-fills them. Measured on EfficientNet-B0 at batch 8:
the 16 gating muls took 10 ms of 100. Inductor avoids this by reusing a dead input's
buffer for a pointwise kernel's output (``config.inplace_buffers``); this pass does the
same for the ATen elementwise ops left in a lowered graph: ``mul(x, g)`` becomes
``mul_(x, g)`` when x's buffer is dead after the op.

Legal only when nobody can observe the write — the conditions of
``fusepass.lowering.inplace.why_not_inplace`` (produced in this graph, no alias of an
input, constant or output, not read afterwards, not read by the op through another
alias, same layout as the result) — plus: the result's dtype is the operand's (no type
promotion). ``add``/``mul`` may write into either operand (both orders round alike in
IEEE arithmetic) — ``add`` with ``alpha != 1`` only into its first, as ``sub``/``div``
and the unary ops.

Runs last, on the lowered graph: before lowering the IR is functional (DESIGN.md), and
every earlier pass may assume so. Every rewrite and every candidate declined for a
reason other than "read again" is reported.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from fusepass.ir import restride, val
from fusepass.postops import REGISTRY
from fusepass.ir.alias import why_not_inplace

aten = torch.ops.aten

# functional op -> (in-place op, operand positions that may receive the result): every
# post-op of the registry (fusepass/postops.py) with an in-place twin, and clamp (a
# spelling of hardtanh, not a post-op of its own), and round (lowering/qdq.py)
TABLE = {p.aten: (p.inplace, p.inplace_operands) for p in REGISTRY.values() if p.inplace}
TABLE[aten.clamp.default] = (aten.clamp_.default, (0,))
TABLE[aten.round.default] = (aten.round_.default, (0,))  # of a quantize spelled in ATen
# a "read again" or "graph input" decline is the common, uninteresting case: not reported
_QUIET = ("is read again", "is a graph input", "is a constant", "not a tensor of this graph")


def _why_not(node, i):
    a, y = node.args[i], val(node)
    if not isinstance(a, torch.fx.Node) or val(a) is None or y is None:
        return "not a tensor of this graph"
    if not isinstance(y, torch.Tensor) or val(a).dtype != y.dtype:
        return f"dtype {val(a).dtype} differs from the result's"
    if i and node.kwargs.get("alpha", 1) != 1:
        return "alpha scales the second operand: the operands cannot swap"
    others = [b for j, b in enumerate(node.args) if j != i]
    return why_not_inplace(node, a, reads=others)


def inplace_pointwise(gm, *, options, report) -> PassResult:
    changed = False
    for node in list(gm.graph.nodes):
        spec = TABLE.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        target, positions = spec
        reasons = {}
        for i in positions:
            why = _why_not(node, i)
            if why is None:
                args = list(node.args)
                if i:  # commutative: the receiving operand goes first
                    args[0], args[i] = args[i], args[0]
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(target, tuple(args), dict(node.kwargs))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                # the result has the receiving operand's strides; where eager's differ
                # in size-1 dims only (alias.why_not_inplace compares the others), a view
                restride(gm, new, tuple(val(args[0]).stride()))
                report.record("inplace_pointwise", str(target), new.name, "rewritten",
                              f"result written into {args[0].name} (dead after the op)")
                changed = True
                break
            reasons[i] = why
        else:
            shown = {i: w for i, w in reasons.items() if not any(q in w for q in _QUIET)}
            if shown:
                report.record("inplace_pointwise", str(target), node.name, "declined",
                              "; ".join(f"operand {i}: {w}" for i, w in shown.items()))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
