"""The public entry points besides the backend: ``optimize`` and ``explain``."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fusepass.capture import lift_module
from fusepass.compiled import Compiled
from fusepass.ir import pin_constants
from fusepass.options import Options
from fusepass.report import Report

_training = operator.itemgetter("training")


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
    flags = [m.__dict__ for m in gm.modules()]  # where each module's `training` lives
    compiled = Compiled(lifted, opts, weights_getter=weights,
                        modes=lambda: tuple(map(_training, flags)))  # ResNet-50: ~5 us
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
