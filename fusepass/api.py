"""The public entry points besides the backend: ``optimize`` and ``explain``."""
from __future__ import annotations

import functools
import operator
import types

import torch
import torch.fx as fx

from fusepass.capture import lift_module
from fusepass.runtime import Compiled
from fusepass.ir import pin_constants
from fusepass.options import Options
from fusepass.report import Report

_training = operator.itemgetter("training")


def training_sensitive(gm: torch.nn.Module) -> list:
    """The module and the submodules whose training flag can change what a call computes,
    read on every call of ``optimize()``'s result (the variant key). A GraphModule's own
    forward was traced: only the modules its graph calls run at call time (with their
    submodules); of those, only modules whose class names ``training`` in a method of its
    own (BatchNorm, dropout, InstanceNorm, RNNs, attention; not conv, linear, ReLU). The
    root's flag is optimize()'s "eval mode". Reading every module's flag instead cost
    156-191 us per call on EfficientNet-B0's 321 modules, caches cold after the graph ran
    (each flag is a lookup in another module's __dict__); its 50 sensitive ones 42-56 us."""
    if isinstance(gm, fx.GraphModule):
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        run = [s for t in sorted(called) for s in gm.get_submodule(t).modules()]
    else:
        run = list(gm.modules())
    return [gm] + [m for m in dict.fromkeys(run) if m is not gm and _reads_training(type(m))]


@functools.lru_cache(maxsize=None)
def _reads_training(cls) -> bool:
    """Does any function a class defines (itself or a base other than nn.Module), nested
    ones and property getters included, name ``training``? Code without a ``__code__``
    to read counts as yes."""
    for base in cls.__mro__:
        if base in (torch.nn.Module, object):
            continue
        for f in vars(base).values():
            f = getattr(f, "fget", None) or getattr(f, "__func__", f)
            if not callable(f) or isinstance(f, type):
                continue
            code = getattr(f, "__code__", None)
            if code is None or hasattr(f, "__wrapped__") or "training" in _names(code):
                return True
    return False


def _names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


class OptimizedGraphModule(fx.GraphModule):
    """The GraphModule ``optimize`` returns: its graph is the variant for the example
    inputs. A call runs the variant matching the inputs' signature (building it after a
    source weight changed or for new shapes), with the runtime's check and fallback."""

    def __deepcopy__(self, memo):
        raise TypeError("a fusepass-optimized graph holds prepacked oneDNN weights, which "
                        "cannot be deep-copied: deep-copy the source module and optimize "
                        "the copy")

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError("fusepass-optimized graphs take positional inputs only")
        compiled = self.__dict__["_fusepass"]
        full, spec = compiled.full_args(args)
        return compiled.variant(full, spec).run(full)


def optimize(gm: torch.nn.Module, example_inputs, **options) -> torch.nn.Module:
    """Optimize any ``fx.GraphModule`` (or traceable module) for inference.

    Returns a runnable GraphModule carrying ``fusepass_report``. When the module cannot
    be optimized for inference (training mode with grad on, capture failure), the input
    module is returned unchanged with the report saying why."""
    opts = Options.from_kwargs(options)
    lifted, weights = lift_module(gm)
    flags = [m.__dict__ for m in training_sensitive(gm)]  # where `training` lives
    compiled = Compiled(lifted, opts, weights_getter=weights,
                        modes=lambda: tuple(map(_training, flags)))
    v = compiled.variant(*compiled.full_args(list(example_inputs)))
    if v.gm is None:
        gm.fusepass_report = v.report
        return gm
    out = pin_constants(OptimizedGraphModule(v.gm, v.gm.graph, class_name="FusepassGraphModule"))
    out.__dict__["_fusepass"] = compiled
    out.fusepass_report = v.report
    return out


def explain(model, *inputs, **options) -> Report:
    """What fusepass does to ``model`` for these inputs, under ``torch.no_grad()``:
    every rewrite, every decline with its reason, every kernel chosen."""
    Options.from_kwargs(options)
    if isinstance(model, fx.GraphModule):
        with torch.no_grad():
            return optimize(model, list(inputs), **options).fusepass_report
    from fusepass.backend import fusepass_backend

    seen = []

    def explaining_backend(gm, example_inputs):  # a fresh identity: dynamo recompiles
        compiled = fusepass_backend(gm, example_inputs, options=options)
        seen.append(compiled)
        return compiled

    with torch.no_grad():
        torch.compile(model, backend=explaining_backend)(*inputs)
    report = Report()
    for c in seen:
        for v in c.variants.values():
            report.extend(v.report)
    return report
