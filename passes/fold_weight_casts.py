"""Fold dtype casts of frozen constants into new constants, once, at compile time.

Why: under ``torch.autocast`` (a user's region, or ``Options.precision="bf16"``, which
capture traces under autocast) every conv/linear weight reaches its op through
``_to_copy(W, dtype=bfloat16)``. Left in the graph that cast runs on every call, and the
weight is no ``get_attr`` constant: ``prepack_weights`` could not pack it and the fused
op would read a fresh copy each time. Here each such cast of a frozen constant becomes a
constant of the cast dtype (one per source tensor and dtype, shared by every user), the
fusion rows and lowering then see a plain bf16 conv/linear with a bf16 weight.

Runs after the fold passes: a BatchNorm or constant folded into an autocast conv is
computed from the fp32 weight behind the cast (``patterns/folding.py`` sees through it)
and rounded to bf16 once, not rounded twice. The source weight is watched as any
frozen weight is (``fusepass/runtime.py``): a change rebuilds the variant.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from fusepass.ir import add_constant, constant, delete_unused_attrs, is_constant
from fusepass.patterns.fold_guards import cast_of


def _foldable(gm, src, dtype) -> bool:
    """A floating-point cast of a frozen constant (casts of activations are no
    candidates: nothing to report)."""
    return (is_constant(gm, src) and constant(gm, src).is_floating_point()
            and dtype.is_floating_point)


def fold_weight_casts(gm, *, options, report) -> PassResult:
    folded = {}  # (source node, dtype) -> new constant
    for node in list(gm.graph.nodes):
        cast = cast_of(node)
        if cast is None or not node.users:  # a cast a fold left dead goes with DCE
            continue
        src, dtype = cast
        if not _foldable(gm, src, dtype):
            continue
        key = (src, dtype)
        if key not in folded:
            with torch.no_grad():
                value = constant(gm, src).to(dtype, copy=True)  # strides preserved
            folded[key] = add_constant(gm, value, "cast", before=node,
                                       source=src.meta.get("fusepass_source"))
        name = node.name
        node.replace_all_uses_with(folded[key])
        gm.graph.erase_node(node)
        report.record("fold_weight_casts", "fold_weight_casts", name, "rewritten",
                      f"{src.name} -> {dtype} constant {folded[key].target}")
    if not folded:
        return PassResult(gm, False)
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(n)
    delete_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
