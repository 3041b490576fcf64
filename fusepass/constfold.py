"""The body of both fold passes: apply the ``fold.*`` rows to a fixpoint.

The rows (``patterns/folding.py``) spell new weights as ATen expressions over frozen
constants, in float64 with one cast back; the rewrite engine evaluates such expressions
once, at compile time, on the real tensors, into new constants
(``fusepass.rewrite.evaluate_constants``): a user's parameter is never written, and a
weight shared with another node keeps its original for that node. Only expressions a
replacement created are evaluated: constant expressions the user wrote (which may be
large, e.g. an ``expand``) are left to run as they were.
"""
from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

from fusepass.ir import delete_unused_attrs
from fusepass.patterns import TABLE
from fusepass.rewrite import apply_rules


def run_fold_rows(gm, prefixes, stage: str, options, report) -> PassResult:
    """Apply the enabled table rows named ``prefix*`` to a fixpoint, then evaluate the new
    weights; the body of both fold passes."""
    rules = [r for p in prefixes for r in TABLE.select(p) if options.enabled(r.name)]
    changed = apply_rules(gm, rules, report, stage=stage, max_rounds=options.fold_rounds)
    if changed:  # the engine evaluated the new weights; drop the ones a later fold replaced
        delete_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
