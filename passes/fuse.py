"""Fuse eltwise/binary epilogues into conv/linear by applying the pattern table.

The rows themselves live in ``fusepass.patterns``; this pass only selects the enabled
rows (``Options.disable``) and runs the rewrite engine to a fixpoint.
"""
from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

from fusepass.patterns import TABLE
from fusepass.rewrite import apply_rules


def fuse(gm, *, options, report) -> PassResult:
    # "fold.*" rows belong to the fold passes, which run before this one.
    rules = [r for r in TABLE if options.enabled(r.name) and not r.name.startswith("fold.")]
    changed = apply_rules(gm, rules, report, stage="fuse")
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
