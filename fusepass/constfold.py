"""Evaluate the constant subgraphs a fold pass created into new ``get_attr`` constants.

The ``fold.*`` rows (``patterns/folding.py``) spell new weights as ATen expressions over
frozen constants, in float64 with one cast back. This module runs those expressions
once, at compile time, on the real tensors and replaces each by a new constant
(``fusepass.ir.add_constant``); the inputs are only read, so a user's parameter is never
written, and a weight shared with another node keeps its original for that node. Only
nodes created by the pass are evaluated: constant expressions the user wrote (which may
be large, e.g. an ``expand``) are left to run as they were.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fusepass.ir import add_constant, delete_unused_attrs, erase_dead
from fusepass.patterns import TABLE
from fusepass.patterns.fold_guards import constant_value, is_constant_expr
from fusepass.rewrite import apply_rules


def _sources(node: fx.Node) -> list:
    seen, out, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            src = n.meta.get("fusepass_source")
            if src and src not in out:
                out.append(src)
        stack.extend(n.all_input_nodes)
    return sorted(out)


def fold_new_constants(gm: fx.GraphModule, before: set) -> int:
    """Replace every maximal constant expression made of nodes not in ``before`` by one
    evaluated constant; returns how many constants were created."""
    new = [n for n in gm.graph.nodes
           if n not in before and n.op == "call_function" and is_constant_expr(gm, n)]
    inside = set(new)
    roots = [n for n in new if any(u not in inside for u in n.users)]
    memo, dead = {}, set(new)
    for n in roots:
        value = constant_value(gm, n, memo).detach()
        ancestors = _ancestors(n)
        dead |= ancestors
        inputs = {getattr(gm, a.target).untyped_storage().data_ptr()
                  for a in ancestors if a.op == "get_attr"}
        if value.untyped_storage().data_ptr() in inputs:
            value = value.clone()  # never hand out a view of a user's tensor as a new weight
        src = "folded(" + ", ".join(_sources(n)) + ")"
        c = add_constant(gm, value, "fold", before=n, source=src)
        n.replace_all_uses_with(c)
    erase_dead(gm, dead)
    delete_unused_attrs(gm)
    return len(roots)


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def run_fold_rows(gm, prefixes, stage: str, options, report) -> PassResult:
    """Apply the enabled table rows named ``prefix*`` to a fixpoint, then evaluate the new
    weights; the body of both fold passes."""
    rules = [r for p in prefixes for r in TABLE.select(p) if options.enabled(r.name)]
    before = set(gm.graph.nodes)
    changed = apply_rules(gm, rules, report, stage=stage, max_rounds=64)
    if changed:
        fold_new_constants(gm, before)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
