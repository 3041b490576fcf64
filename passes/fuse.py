"""Fuse eltwise/binary epilogues into conv/linear by applying the pattern table.

The rows themselves live in ``fusepass.patterns``; this pass selects the enabled rows
(``Options.disable``), hands the rows' ``lowerable`` guard the lowering table of the
chosen target (a row fuses only what that target has a kernel for) and runs the rewrite
engine to a fixpoint.
"""
from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

import torch.fx as fx

from fusepass import lowering
from fusepass import ops as fp
from fusepass.lowering.table import Form
from fusepass.patterns import TABLE
from fusepass.rewrite import apply_rules


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def asker(targets):
    """``lowerable(match, post, scalars, other)``: the lowering table's answer for the
    fused op a row would make of ``match``."""
    def lowerable(m, post, scalars, other):
        op = next(n.target for n in m.nodes if n.target in fp.FUSED_OPS)
        conv = op in fp.CONV_OPS
        form = Form(op, m.val("x"), m.val("weight"), _val(m["bias"]), _val(other), tuple(post),
                    tuple(scalars), m.anchor.meta.get("val"),
                    bool(m["transposed"]) if conv else False, m["groups"] if conv else 1)
        return lowering.why_not(targets, form)
    return lowerable


def fuse(gm, *, options, report) -> PassResult:
    # "fold.*" rows belong to the fold passes, which run before this one; "int8.*" rows
    # to fuse_int8, which runs after it.
    rules = [r for r in TABLE if options.enabled(r.name) and not r.name.startswith(("fold.", "int8."))]
    targets = lowering.targets_of(options.lowering, available=True)
    changed = apply_rules(gm, rules, report, stage="fuse", max_rounds=options.fuse_rounds,
                          lowerable=asker(targets))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
