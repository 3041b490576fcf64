"""Rows: conv/linear followed by one eltwise op -> the fused op with it in its chain.

Rows come from a product of families (conv1d/2d/3d, linear) and eltwise spellings; each
spelling is an ATen fragment over the conv/linear output ``y`` plus how its bound
parameters become the post-op name and scalars. Order matters where spellings nest:
``y * sigmoid(y)`` (silu) is listed before ``sigmoid``.
"""
from __future__ import annotations

import inspect
import itertools

import torch

from fusepass import ops as fp
from fusepass.patterns import guards as G
from fusepass.patterns.table import Rule

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

# spelling name -> (post-op fragment over y with extras e0.., number of extras,
#                   (extras) -> (post names, scalars), guard, comment)
SPELLINGS = {
    "relu": (lambda y: aten.relu.default(y), 0, lambda: (["relu"], []), None, "relu(y)"),
    "silu": (lambda y: aten.silu.default(y), 0, lambda: (["silu"], []), None, "silu(y)"),
    "silu_mul": (lambda y: aten.mul.Tensor(y, aten.sigmoid.default(y)), 0,
                 lambda: (["silu"], []), None, "y*sigmoid(y), either order"),
    "sigmoid": (lambda y: aten.sigmoid.default(y), 0, lambda: (["sigmoid"], []), None, "sigmoid(y)"),
    "tanh": (lambda y: aten.tanh.default(y), 0, lambda: (["tanh"], []), None, "tanh(y)"),
    "gelu": (lambda y, e0: aten.gelu.default(y, approximate=e0), 1,
             lambda e0: (["gelu" if e0 == "none" else "gelu_tanh"], []), G.gelu_approximate,
             "gelu(y), erf or tanh"),
    "hardtanh": (lambda y, e0, e1: aten.hardtanh.default(y, e0, e1), 2,
                 lambda e0, e1: (["hardtanh"], [float(e0), float(e1)]), G.hardtanh_bounds,
                 "hardtanh/relu6(y)"),
    "clamp": (lambda y, e0, e1: aten.clamp.default(y, e0, e1), 2,
              lambda e0, e1: (["hardtanh"], [float(e0), float(e1)]), G.hardtanh_bounds,
              "clamp(y, min, max)"),
    "leaky_relu": (lambda y, e0: aten.leaky_relu.default(y, e0), 1,
                   lambda e0: (["leaky_relu"], [float(e0)]), G.finite_scalars, "leaky_relu(y)"),
    "elu": (lambda y, e0, e1, e2: aten.elu.default(y, e0, e1, e2), 3,
            lambda e0, e1, e2: (["elu"], [float(e0), float(e1), float(e2)]), G.finite_scalars,
            "elu(y)"),
    "hardswish": (lambda y: aten.hardswish.default(y), 0, lambda: (["hardswish"], []), None,
                  "hardswish(y)"),
    "hardsigmoid": (lambda y: aten.hardsigmoid.default(y), 0, lambda: (["hardsigmoid"], []), None,
                    "hardsigmoid(y)"),
}
CONV_SPELLINGS = list(SPELLINGS)
LINEAR_SPELLINGS = ["relu", "gelu", "silu", "silu_mul", "sigmoid", "tanh"]


def _with_signature(fn, names):
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fn


def epilogue_row(family: str, spelling: str) -> Rule:
    op, arg_names, when = FAMILIES[family]
    fragment, n_extra, to_chain, extra_guard, comment = SPELLINGS[spelling]
    extras = [f"e{i}" for i in range(n_extra)]
    names = arg_names + extras
    n = len(arg_names)

    def pattern(*a):
        return fragment(op(*a[:n]), *a[n:])

    def replacement(*a):
        base, ex = list(a[:n]), a[n:]
        add_post, add_scalars = to_chain(*ex)
        base[-2] = list(base[-2]) + add_post
        base[-1] = list(base[-1]) + add_scalars
        return op(*base)

    post_name = {"silu_mul": "silu", "clamp": "hardtanh"}.get(spelling, spelling)
    kind = "conv" if family.startswith("conv") else "linear"
    guards = [G.kernel_dtype, G.unary_chain(kind), G.after_binary_allowed(kind, post_name)]
    if extra_guard:
        guards.append(extra_guard)
    name = f"{family}.{spelling}"
    return Rule(name, _with_signature(pattern, names), _with_signature(replacement, names),
                G.all_of(*guards), f"{family}(x) -> {comment} fused into its post-op chain",
                when)


ROWS = [epilogue_row(f, s) for f, s in itertools.product(["conv1d", "conv2d", "conv3d"], CONV_SPELLINGS)]
ROWS += [epilogue_row("linear", s) for s in LINEAR_SPELLINGS]
