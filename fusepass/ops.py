"""The fusepass ops: the backend-neutral form of a fused conv/linear region.

Capture turns every convolution into ``fusepass::conv`` and every ``F.linear`` into
``fusepass::linear`` with an empty post-op chain; the fuse pass appends post-ops to the
chain; lowering maps (op, chain, dtype) to a kernel of the chosen target. Each op has a
fake kernel (shapes only) and a reference kernel in plain ATen, which is also what runs
when no target kernel exists for a chain.

A chain is a list of names applied in order to the conv/linear output ``y``:
binary names combine ``y`` with the op's ``other`` tensor (``y + other``, ...), unary
names take their scalar parameters, in order, from the flat ``scalars`` list.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fusepass.postops import REGISTRY

aten = torch.ops.aten

POST_OPS = REGISTRY  # name -> PostOp (fusepass/postops.py: one row per post-op)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what some target's fused kernels compute in


def split_chain(post: Sequence[str], scalars: Sequence[float]):
    """Yield (PostOp, its scalars) for a chain; raises ValueError on a malformed chain."""
    i = 0
    for name in post:
        if name not in POST_OPS:
            raise ValueError(f"unknown post-op {name!r}; known: {sorted(POST_OPS)}")
        op = POST_OPS[name]
        yield op, list(scalars[i : i + op.arity])
        i += op.arity
    if i != len(scalars):
        raise ValueError(f"chain {list(post)} takes {i} scalars, got {len(scalars)}")


def apply_chain(y, other, post, scalars):
    for op, s in split_chain(post, scalars):
        y = op.reference(y, other, *s)
    return y


def conv_reference(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                   other, post, scalars):
    y = aten.convolution.default(x, weight, bias, stride, padding, dilation, transposed,
                                 output_padding, groups)
    return apply_chain(y, other, post, scalars)


def linear_reference(x, weight, bias, other, post, scalars):
    y = aten.linear.default(x, weight, bias)
    return apply_chain(y, other, post, scalars)


_lib = torch.library.Library("fusepass", "DEF")
_lib.define(
    "conv(Tensor x, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, "
    "Tensor? other, str[] post, float[] scalars) -> Tensor"
)
_lib.define(
    "linear(Tensor x, Tensor weight, Tensor? bias, Tensor? other, str[] post, "
    "float[] scalars) -> Tensor"
)
# The reference kernels serve every backend key (CPU, Meta, fake): they are plain ATen.
_lib.impl("conv", conv_reference, "CompositeExplicitAutograd")
_lib.impl("linear", linear_reference, "CompositeExplicitAutograd")
torch.library.register_fake("fusepass::conv", conv_reference, lib=_lib)
torch.library.register_fake("fusepass::linear", linear_reference, lib=_lib)

conv = torch.ops.fusepass.conv.default
linear = torch.ops.fusepass.linear.default
FUSED_OPS = (conv, linear)
REFERENCE = {conv: conv_reference, linear: linear_reference}

# Positions of the chain arguments, shared by passes that read or extend a chain.
CHAIN_ARGS = {conv: (9, 10, 11), linear: (3, 4, 5)}  # other, post, scalars


def chain_of(node) -> tuple:
    """(other, post, scalars) of a fusepass op node."""
    i, j, k = CHAIN_ARGS[node.target]
    return node.args[i], list(node.args[j]), list(node.args[k])
