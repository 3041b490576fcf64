"""Rows: conv/linear followed by one eltwise op -> the fused op with it in its chain.

Rows come from the post-op registry (``fusepass/postops.py``): one row per family
(conv1d/2d/3d, linear) and spelling of every eltwise post-op that some target has a
kernel for on that family (``postops.spelled``). Whether the *chosen* target takes the
fused form is the ``lowerable`` guard's question, asked of the lowering table before the
row fuses. Order matters where spellings nest: ``y * sigmoid(y)`` (silu) comes before
``sigmoid`` in the registry.
"""
from __future__ import annotations

import torch

from fusepass import ops as fp
from fusepass import postops
from fusepass.patterns import guards as G
from fusepass.patterns.table import Rule, with_signature

aten = torch.ops.aten

CONV_ARGS = ["x", "weight", "bias", "stride", "padding", "dilation", "transposed",
             "output_padding", "groups", "other", "post", "scalars"]
LINEAR_ARGS = ["x", "weight", "bias", "other", "post", "scalars"]
FAMILIES = {
    # name: (op, arg names, silent filter)
    "conv1d": (fp.conv, CONV_ARGS, G.conv_rank(1)),
    "conv2d": (fp.conv, CONV_ARGS, G.conv_rank(2)),
    "conv3d": (fp.conv, CONV_ARGS, G.conv_rank(3)),
    "linear": (fp.linear, LINEAR_ARGS, None),
}


def kind_of(family: str) -> str:
    return "conv" if family.startswith("conv") else "linear"


def epilogue_row(family: str, post_op, spelling) -> Rule:
    op, arg_names, when = FAMILIES[family]
    extras = [f"e{i}" for i in range(spelling.n_extra)]
    names = arg_names + extras
    n = len(arg_names)

    def new_chain(m):
        scalars = spelling.scalars(*(m[e] for e in extras))
        return [post_op.name], [float(s) if isinstance(s, (int, float)) else s for s in scalars]

    def pattern(*a):
        return spelling.fragment(op(*a[:n]), *a[n:])

    def replacement(*a):
        base = list(a[:n])
        _, add_scalars = new_chain(dict(zip(names, a)))
        base[-2] = list(base[-2]) + [post_op.name]
        base[-1] = list(base[-1]) + add_scalars
        return op(*base)

    guards = [G.kernel_dtype, G.scalars_valid(post_op, new_chain), G.lowerable(new_chain)]
    return Rule(f"{family}.{spelling.name}", with_signature(pattern, names),
                with_signature(replacement, names), G.all_of(*guards),
                f"{family}(x) -> {spelling.comment} fused into its post-op chain", when)


ROWS = [epilogue_row(f, p, s) for f in FAMILIES for p, s in postops.spelled(kind_of(f))]
