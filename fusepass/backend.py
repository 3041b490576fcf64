"""The ``fusepass`` torch.compile backend (entry point ``torch_dynamo_backends``).

``torch.compile(m, backend="fusepass", options={...})`` finds this function through the
entry point, so users need no ``import fusepass``. Dynamo hands over a torch-level graph
with parameters lifted to placeholders and the real tensors among the inputs; the
returned callable gets them again on every call, which makes the freshness check exact.
"""
from __future__ import annotations

import torch

from fusepass.capture import lift_dynamo
from fusepass.runtime import Compiled
from fusepass.options import Options


def _concrete(a):
    """A SymInt/SymFloat example input (dynamic=True sizes) as the value Dynamo saw: calls
    get plain ints, so a variant keyed by the symbol would be built once and never used."""
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = a.node.hint
        return hint if hint is not None else a
    return a


def fusepass_backend(gm, example_inputs, options=None, mode=None, **kwargs):
    if mode not in (None, "default"):
        kwargs["mode"] = mode
    opts = Options.from_kwargs(options, **kwargs)  # bad options raise here, to the user
    compiled = Compiled(lift_dynamo(gm, example_inputs), opts)
    compiled.variant([_concrete(a) for a in example_inputs])  # compile now: compile time is the first call
    return compiled
