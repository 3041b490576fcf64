"""Rows: conv/linear output combined with a same-shape tensor -> a binary post-op.

The residual add of ResNet blocks (``out += identity``, which capture's functionalization
turns into ``aten.add``) and transformer residuals ``linear(x) + h`` become the fused op's
chain ``["add"]``; the ReLU after a ResNet add is then taken by the ``conv*d.relu`` rows
(the epilogue guards accept relu after a binary post-op), giving ``["add", "relu"]``.

Rows come from the post-op registry (``fusepass/postops.py``): one per family and binary
post-op some target has a kernel for (oneDNN: conv add/sub/mul/div, linear add/sub/mul;
IPEX: add/sub, linear mul); the ``lowerable`` guard asks the chosen target's lowering
table (conv1d has no binary kernel on either). ``add`` and ``mul`` also match the
conv/linear as the right operand (the engine tries swapped operands); ``sub``/``div``
only with the conv/linear on the left (``t - conv(x)`` is no post-op).
Whether the kernel accumulates in place into ``other`` is lowering's decision, not ours.

The table lists these rows before the eltwise rows, so conv -> add -> relu collapses in
one round of the engine (the add first, then ``conv2d.relu`` on the fused op); the
engine's fixpoint would get there in two rounds otherwise. A relu *before* the add
(``relu(conv(x)) + t``) is declined: the kernels take the binary post-op first.
"""
from __future__ import annotations

import torch

from fusepass import postops
from fusepass.patterns import binary_guards as B
from fusepass.patterns import guards as G
from fusepass.patterns.epilogues import FAMILIES, kind_of
from fusepass.patterns.table import Rule, with_signature

aten = torch.ops.aten

# the binary post-ops' ATen spellings: op name -> (fragment over y, other[, alpha],
# takes alpha, symbol); the registry says which families have kernels for them
BINOPS = {
    "add": (lambda y, o, alpha: aten.add.Tensor(y, o, alpha=alpha), True, "+"),
    "sub": (lambda y, o, alpha: aten.sub.Tensor(y, o, alpha=alpha), True, "-"),
    "mul": (lambda y, o: aten.mul.Tensor(y, o), False, "*"),
    "div": (lambda y, o: aten.div.Tensor(y, o), False, "/"),
}

def binary_row(family: str, binop: str) -> Rule:
    op, arg_names, when = FAMILIES[family]
    fragment, takes_alpha, sym = BINOPS[binop]
    # the op's own (empty) binary operand is "prev_other"; the bound operand is "other"
    base = ["prev_other" if a == "other" else a for a in arg_names]
    names = base + ["other"] + (["alpha"] if takes_alpha else [])
    n, i_other = len(base), arg_names.index("other")

    def pattern(*a):
        return fragment(op(*a[:n]), *a[n:])

    def replacement(*a):
        args = list(a[:n])
        args[i_other], args[-2], args[-1] = a[n], [binop], []
        return op(*args)

    guards = [G.kernel_dtype, B.empty_chain, B.other_is_tensor, B.same_shape, B.same_dtype]
    if takes_alpha:
        guards.append(B.alpha_is_one)
    guards += [B.eager_layout, B.no_cycle, G.lowerable(lambda b: ([binop], []))]
    either = " (either order)" if binop in ("add", "mul") else ""
    return Rule(f"{family}.{binop}", with_signature(pattern, names),
                with_signature(replacement, names), G.all_of(*guards),
                f"{family}(x) {sym} other{either} -> binary post-op {binop!r}", when)


ROWS = [binary_row(f, b) for f in FAMILIES for b in postops.BINARY
        if postops.has_kernel(b, kind_of(f))]
