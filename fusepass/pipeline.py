"""The pass pipeline: every stage — folds, fuse, layout, lowering, prepacking, in-place
— is a pass of one ``torch.fx`` ``PassManager``, in DESIGN.md's order.

Each pass runs under a guard: an exception inside a pass undoes that pass (the graph is
captured again and the passes before it replayed, or restored from a snapshot when no
recapture is given) and is recorded; the rest of the pipeline goes on. With
``Options.verify`` (``FUSEPASS_VERIFY=1``; the test suite turns it on for every test) the
manager's checks (``add_checks``) run before the first pass and after every pass:
``graph.lint()`` and a fake-tensor re-propagation compared with ``meta["val"]`` — shapes,
dtypes and strides. A failed check raises out of the pipeline (the runtime then runs the
graph unoptimized, reported as a fallback, which fails a test).
"""
from __future__ import annotations

import torch
from torch.fx._lazy_graph_module import _LazyGraphModule
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager
from torch.utils._pytree import tree_flatten, tree_map

from fusepass.errors import GraphError
from fusepass.ir import as_cpu_kernel_writes, is_meta_value, pin_constants, suggest_memory_format
from fusepass.lowering import lower
from fusepass.passes.fold_batchnorm import fold_batchnorm
from fusepass.passes.fold_binary_constants import fold_binary_constants
from fusepass.passes.fold_weight_casts import fold_weight_casts
from fusepass.passes.fuse import fuse
from fusepass.passes.fuse_int8 import fuse_int8
from fusepass.passes.inplace_pointwise import inplace_pointwise
from fusepass.passes.prepack_weights import prepack_weights
from fusepass.passes.propagate_layout import propagate_layout
from fusepass.report import Report


def lower_pass(gm, *, options, report) -> PassResult:
    """Fused ops -> the chosen target's kernels (``fusepass/lowering``)."""
    return PassResult(lower(gm, options, report), True)


# prepack_weights is target-specific (it rewrites mkldnn nodes only) and follows lowering;
# inplace_pointwise gives up the IR's functional form, so it comes last.
STAGES = [
    ("fold_batchnorm", fold_batchnorm),
    ("fold_binary_constants", fold_binary_constants),
    ("fold_weight_casts", fold_weight_casts),
    ("fuse", fuse),
    ("fuse_int8", fuse_int8),
    ("propagate_layout", propagate_layout),
    ("lower", lower_pass),
    ("prepack_weights", prepack_weights),
    ("inplace_pointwise", inplace_pointwise),
]
PASS_NAMES = [name for name, _ in STAGES if name != "lower"]  # what `disable` may name


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
            except GraphError:  # the input's fault, not the pass's: to the user
                raise
            except Exception as e:
                report.record(name, "-", "-", "error", f"{type(e).__name__}: {e} (pass undone)")
                if snap is None:
                    gm = self._replay()
                else:
                    gm.graph = snap
                    gm.recompile()
                return PassResult(gm, False)
            self.done.append(fn)
            return result

        run.__name__ = name
        return run

    def _replay(self):
        gm, scratch = self.recapture(), Report()
        for fn in self.done:
            gm = fn(gm, options=self.options, report=scratch).graph_module
        return gm


# The stages whose result is still target-neutral: what ``fusepass.save`` writes and the
# compile cache stores (``fusepass/deploy.py``); the rest run where the graph runs.
NEUTRAL_STAGES = tuple(name for name, _ in STAGES[:[n for n, _ in STAGES].index("lower")])
TARGET_STAGES = tuple(name for name, _ in STAGES if name not in NEUTRAL_STAGES)


def run_pipeline(gm, options, report, recapture=None, stages=None):
    """``recapture() -> GraphModule``, when given, rebuilds the captured graph: a failed
    pass is then undone by capturing again and replaying, instead of by a graph copy
    taken before every pass. ``stages``, when given, names the stages to run (in
    ``STAGES`` order): ``NEUTRAL_STAGES`` or ``TARGET_STAGES``."""
    undo = _Undo(recapture, options)
    passes = [undo.step(n, f, report) for n, f in STAGES
              if (stages is None or n in stages) and (n == "lower" or options.enabled(n))]
    manager = PassManager(passes=passes, run_checks_after_each_pass=options.verify)
    if options.verify:
        manager.add_checks(verify)
    try:
        gm = manager(gm).graph_module
    except Exception as e:  # PassManager wraps what a pass raised: a GraphError goes out as is
        cause = e
        while cause is not None and not isinstance(cause, GraphError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    _LazyGraphModule.force_recompile(gm)  # a captured graph's code, generated once (capture.py)
    # constants stay buffers until the last stage: later passes find (and drop) them there
    return pin_constants(gm) if stages is None or STAGES[-1][0] in stages else gm


def verify(gm):
    """lint + re-propagate fake tensors from the placeholders; compare with meta: shape,
    dtype and the strides of every dim of size > 1. A loaded graph's meta values are
    compared the same way (``deploy.load`` runs this on the file's graph first)."""
    gm.graph.lint()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env = {}

    def fresh(v):
        if is_meta_value(v):  # a loaded graph's value: a CPU tensor of that spec
            return _refake(mode, v)
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
        if _is_kernel(n.target):  # outside the IR: the kernel's own layout rule, if known
            out = kernel_value(gm, mode, n, env)
        else:
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            with mode:
                out = n.target(*args, **kwargs)
            out = as_cpu_kernel_writes(n, out, list(args))
        env[n] = out
        got, want = tree_flatten(out)[0], tree_flatten(n.meta.get("val"))[0]
        for g, w in zip(got, want):
            if isinstance(g, torch.Tensor) and (g.shape != w.shape or g.dtype != w.dtype
                                                or not same_strides(g, w)):
                raise AssertionError(
                    f"{n.name} meta {tuple(w.shape)}/{w.dtype}/{tuple(w.stride())} but "
                    f"propagates to {tuple(g.shape)}/{g.dtype}/{tuple(g.stride())}")


def same_strides(a, b) -> bool:
    return all(x == y for x, y, d in zip(a.stride(), b.stride(), a.shape) if d > 1)


mkldnn = torch.ops.mkldnn
# kernel -> position of its (possibly packed) weight
_WEIGHT = {mkldnn._convolution_pointwise.default: 1, mkldnn._convolution_pointwise.binary: 2,
           mkldnn._convolution_pointwise_.binary: 2}


def kernel_value(gm, mode, n, env):
    """A kernel's result as the real kernel lays it out, where its rule is known (stock
    oneDNN convs, measured on torch 2.13: channels-last when the input or the weight
    suggests it or the weight is packed; the in-place sum returns ``other``); other
    kernels (linear, IPEX's) are trusted: their meta is the fused op's."""
    v = tree_map(lambda t: _refake(mode, t), n.meta["val"])
    if n.target not in _WEIGHT or not isinstance(v, torch.Tensor) or v.dim() != 4:
        return v
    if n.target is mkldnn._convolution_pointwise_.binary:
        return env[n.args[0]]
    wnode = n.args[_WEIGHT[n.target]]
    weight = getattr(gm, wnode.target, None) if wnode.op == "get_attr" else None
    x, w = env[n.args[0]], env[wnode]
    cl = (getattr(weight, "is_mkldnn", False) or torch.channels_last in (
        suggest_memory_format(x), suggest_memory_format(w)))
    fmt = torch.channels_last if cl else torch.contiguous_format
    with mode:
        return torch.empty(v.shape, dtype=v.dtype, memory_format=fmt)


def _is_kernel(target) -> bool:
    """A target kernel (``mkldnn::*``, ``ipex_prepack::*``, ...), not an IR op: their fake
    kernels are partial (mkldnn conv1d, .binary) or absent (TorchScript-only IPEX ops)."""
    return getattr(target, "namespace", None) not in (None, "aten", "fusepass", "prims")


def _refake(mode, v):
    """A fake tensor of ``mode`` with ``v``'s shape, strides and dtype (on the CPU for a
    loaded graph's meta value)."""
    if not isinstance(v, torch.Tensor):
        return v
    with mode:
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype,
                                   device="cpu" if is_meta_value(v) else v.device)
