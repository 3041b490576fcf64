"""The pass pipeline: passes in DESIGN.md's order, then lowering.

Each pass runs under a guard: an exception inside a pass undoes that pass (the graph is
captured again and the passes before it replayed, or restored from a snapshot when no
recapture is given) and is recorded; the rest of the pipeline goes on. With
``VERIFY`` on (the test suite's autouse fixture), every pass is followed by
``graph.lint()`` and a fake-tensor re-propagation compared against ``meta["val"]``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager
from torch.utils._pytree import tree_flatten, tree_map

from fusepass.ir import pin_constants
from fusepass.lowering import lower
from fusepass.passes.fold_batchnorm import fold_batchnorm
from fusepass.passes.fold_binary_constants import fold_binary_constants
from fusepass.passes.fuse import fuse
from fusepass.passes.inplace_pointwise import inplace_pointwise
from fusepass.passes.prepack_weights import prepack_weights
from fusepass.passes.propagate_layout import propagate_layout
from fusepass.report import Report

PASSES = [
    ("fold_batchnorm", fold_batchnorm),
    ("fold_binary_constants", fold_binary_constants),
    ("fuse", fuse),
    ("propagate_layout", propagate_layout),
]
# After lowering (run_pipeline): prepack_weights is target-specific (it rewrites mkldnn
# nodes only); inplace_pointwise gives up the IR's functional form, so it comes last.
# Both are pass names all the same: disable=["inplace_pointwise"] is a valid option.
POST_LOWERING = [
    ("prepack_weights", prepack_weights),
    ("inplace_pointwise", inplace_pointwise),
]
PASS_NAMES = [name for name, _ in PASSES] + [name for name, _ in POST_LOWERING]
VERIFY = False


def _snapshot(gm) -> fx.Graph:
    g = fx.Graph(owning_module=gm)
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return g


class _Undo:
    """How a failed pass is undone. With ``recapture`` (what ``Compiled`` passes), the
    graph is captured again and the steps that ran before the failure are replayed into
    a scratch report (their decisions are already recorded): passes are deterministic, so
    this rebuilds the graph as it was, and a success costs nothing — a graph copy before
    every pass cost ~15 % of ResNet-50's backend time. Without it, each step snapshots."""

    def __init__(self, recapture, options):
        self.recapture, self.options, self.done = recapture, options, []

    def step(self, name, fn, report):
        def run(gm):
            snap = None if self.recapture else _snapshot(gm)
            try:
                result = fn(gm, options=self.options, report=report)
            except Exception as e:
                report.record(name, "-", "-", "error", f"{type(e).__name__}: {e} (pass undone)")
                if snap is None:
                    gm = self._replay()
                else:
                    gm.graph = snap
                    gm.recompile()
                return PassResult(gm, False)
            if VERIFY:
                verify(result.graph_module, name)
            self.done.append(fn)
            return result

        run.__name__ = name
        return run

    def _replay(self):
        gm, scratch = self.recapture(), Report()
        for fn in self.done:
            gm = fn(gm, options=self.options, report=scratch).graph_module
        return gm


def _lower(gm, *, options, report):
    return PassResult(lower(gm, options, report), True)


def run_pipeline(gm, options, report, recapture=None):
    """``recapture() -> GraphModule``, when given, rebuilds the captured graph: a failed
    pass is then undone by capturing again and replaying, instead of by a graph copy
    taken before every pass."""
    undo = _Undo(recapture, options)
    passes = [undo.step(n, f, report) for n, f in PASSES if options.enabled(n)]
    if passes:
        gm = PassManager(passes=passes)(gm).graph_module
    gm = _lower(gm, options=options, report=report).graph_module
    undo.done.append(_lower)
    # oneDNN's blocked weight format only means something to the mkldnn kernels the onednn
    # target emits: prepack_weights rewrites those nodes and leaves any other graph alone.
    for name, fn in POST_LOWERING:
        if options.enabled(name):
            gm = undo.step(name, fn, report)(gm).graph_module
    return pin_constants(gm)


def verify(gm, after: str):
    """lint + re-propagate fake tensors from the placeholders; compare with meta."""
    gm.graph.lint()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env = {}

    def fresh(v):
        return mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = tree_map(fresh, n.meta["val"])
            continue
        if n.op == "get_attr":
            t = getattr(gm, n.target)
            # a prepacked oneDNN weight is opaque: its meta holds the dense weight's value
            env[n] = _refake(mode, n.meta["val"]) if getattr(t, "is_mkldnn", False) else fresh(t)
            continue
        if n.op == "output":
            continue
        if _is_kernel(n.target):  # a lowered kernel is outside the IR: trust its meta
            env[n] = tree_map(lambda v: _refake(mode, v), n.meta["val"])
            continue
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        with mode:
            out = n.target(*args, **kwargs)
        env[n] = out
        got, want = tree_flatten(out)[0], tree_flatten(n.meta.get("val"))[0]
        for g, w in zip(got, want):
            if isinstance(g, torch.Tensor) and (g.shape != w.shape or g.dtype != w.dtype):
                raise AssertionError(f"after {after}: {n.name} meta {tuple(w.shape)}/{w.dtype} "
                                     f"but propagates to {tuple(g.shape)}/{g.dtype}")


def _is_kernel(target) -> bool:
    """A target kernel (``mkldnn::*``, ``ipex_prepack::*``, ...), not an IR op: their fake
    kernels are partial (mkldnn conv1d, .binary) or absent (TorchScript-only IPEX ops)."""
    return getattr(target, "namespace", None) not in (None, "aten", "fusepass", "prims")


def _refake(mode, v):
    """A fake tensor of ``mode`` with ``v``'s shape, strides and dtype."""
    if not isinstance(v, torch.Tensor):
        return v
    with mode:
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
