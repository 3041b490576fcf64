"""The runtime of a compiled graph: one optimized variant per key (input signature, grad
mode, training flags), rebuilt when a weight it was folded from changes.

Folded weights are derived data (DESIGN.md, "Freezing is explicit"): every call of a
variant compares each weight that variant froze with the snapshot it was built from
(``Watch``; pytorch#104984):
  * the tensor object itself (the snapshot holds it, so neither its id nor its memory
    can be reused by a replacement while we compare against it): a replaced parameter,
    ``load_state_dict(assign=True)``;
  * ``(data_ptr, _version)``: in-place updates, ``load_state_dict``, ``p.data = t``;
  * the values of BatchNorm running means and variances: ``native_batch_norm`` updates
    them in a training-mode step without bumping their version counter (its schema does
    not declare the write), and they are small, so they are compared by value. Both:
    a step whose batch mean equals the running mean bit for bit (zero-mean data on a
    fresh BatchNorm) changes the variance alone.
Weights the graph holds itself (Dynamo installs them as ``get_attr`` under Inductor's
freezing flag or ``prepare_freezing``) are watched by reference the same way (a replaced
Parameter makes Dynamo recompile: it guards their identity then); their small buffers are
compared by value, BatchNorm statistics among them.
A difference drops every variant folded from the changed weights. Writes through
``p.data`` (a tensor with its own version counter), through numpy or DLPack views and to
inference tensors (no version counter) remain invisible, and README.md says so: no exact
check is cheap, and a sampled one (a word per weight, compared like the statistics)
measured 98-146 us per call on ResNet-50's 214 weights not already compared by value,
49-73 us even as one numpy gather over raw addresses, against a budget well under 0.1
ms; it would still miss writes to unsampled elements.
Weights the graph writes itself (a training-mode BatchNorm's running statistics and
``num_batches_tracked``, under no_grad) are state, not constants: capture leaves them
inputs, so they are neither folded nor watched and the variant is built once.
Shapes, strides and dtypes of the other inputs key the variants, so a graph optimized
for batch 1 is rebuilt, never misused, for batch 8. ``optimize()``'s module may take
lists, tuples or dicts: the graph is captured over their leaves (make_fx flattens its
inputs) and called with the leaves; their structure keys the variant too.
Several instances of one module class (an ensemble, two fine-tunes of one architecture)
reach one Compiled: Dynamo traces them into one graph with their weights as inputs. The
first weight's identity keys the variant, so each instance gets its own (up to
``MAX_WEIGHT_SETS``); a changed weight drops only the variants that share the changed
tensors. Before, each call found the other instance's weights, rebuilt and dropped the
other's variant: two ResNet-50s ran at 570 ms a call instead of 26 (Zen 5).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fusepass import precision
from fusepass.check import check_variant
from fusepass.errors import GraphError
from fusepass.capture import Lifted, capture, inference_reason, lift_leaves
from fusepass.options import Options
from fusepass.pipeline import run_pipeline
from fusepass.report import Report


@dataclass
class Variant:
    run: Callable  # (full args) -> output in the original structure
    report: Report
    gm: Optional[fx.GraphModule] = None  # the optimized graph, when there is one
    checked: bool = field(default=True)  # False until a check-mode first call ran
    watch: Optional["Watch"] = None  # what an optimized variant folded; None: nothing


_BN = {torch.ops.aten.native_batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
       torch.ops.aten._native_batch_norm_legit_no_training.default,
       torch.ops.aten._native_batch_norm_legit_functional.default}


def bn_statistics(gm: fx.GraphModule, weights: dict) -> list:
    """Arg indices of the weights a captured graph uses as BatchNorm running means or
    variances. Both: the mean alone does not tell, a training-mode step leaves it
    unchanged when the batch mean equals it exactly and still changes the variance.
    EfficientNet-B0 (49 BatchNorms, 98 tensors, 168 KB), right after the graph ran, on a
    loaded 2-core machine: 134-191 us per call, 84-117 us for the means alone."""
    names = {a.meta.get("fusepass_source") for n in gm.graph.nodes if n.target in _BN
             for a in n.args[3:5] if isinstance(a, fx.Node)}
    return [i for i, name in weights.items() if name in names]


WATCH_BY_VALUE_BYTES = 1 << 20  # a graph-attribute buffer up to this size is compared by value
# Variants of one graph that differ only in their weights (several instances of one module
# class under Dynamo, which traces them into one graph): each holds its own folded copy
MAX_WEIGHT_SETS = 4


def _byte_view(t: torch.Tensor):
    """``t``'s bytes as a numpy uint8 array and whether that array is a copy: a view of
    ``t``'s own memory when ``t`` is one contiguous block, else a copy (made anew per call)."""
    copied = not t.is_contiguous()
    flat = t.detach().reshape(-1)
    return (flat.contiguous() if copied else flat).view(torch.uint8).numpy(), copied


class StatsWatch:
    """BatchNorm running statistics (and, for weights a graph holds as attributes, its small
    buffers) as they were when folded, compared bitwise (NaN included) on every call.
    Their memory is read through numpy views made once, gathered by one ``bytes.join``
    and compared by one memcmp: EfficientNet-B0's 49 means, caches cold as they are after
    the graph ran, 145 us per call with ``torch.cat`` + numpy, ~40 us so. A view stays
    valid while its tensor keeps its memory, which the data-pointer check ahead of this
    one guarantees (a new ``p.data`` drops the variants and this watch)."""

    def __init__(self):
        self.keys: set = set()  # what is watched (an arg index, a graph attribute's name)
        self.views: list = []  # numpy views, or the tensor itself when strided (copied per call)
        self.want = b""  # their bytes when folded, in the order of views

    def add(self, key, t: torch.Tensor):
        if key in self.keys:
            return
        view, copied = _byte_view(t)
        self.keys.add(key)
        self.views.append(t if copied else view)
        self.want += view.tobytes()

    def unchanged(self) -> bool:
        if not self.views:
            return True
        views = [v if isinstance(v, np.ndarray) else _byte_view(v)[0] for v in self.views]
        return b"".join(views) == self.want


def signature(args, skip) -> tuple:
    sig = []
    for i, a in enumerate(args):
        if i in skip:
            continue
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), tuple(a.stride()), a.dtype, a.device, a.requires_grad))
        elif isinstance(a, (int, float, bool, str, type(None))):
            sig.append((type(a), a))
        else:
            sig.append(type(a))
    return tuple(sig)


class Watch:
    """What one optimized variant folded, as it was then; ``fresh`` compares on every call
    of that variant, on cold caches (the graph just ran), one pass per property over
    plain lists (EfficientNet-B0, 360 weights and 98 BatchNorm statistics: 0.55-0.77 ms
    per call on a loaded 2-core machine, most of it the data pointers and versions).
    Only the weights the variant froze are watched: the ones its graph writes itself
    (``Captured.state``) are inputs it reads afresh on every call."""

    def __init__(self, full, frozen: list, attrs: dict):
        self.idx = frozen
        self.weights = [full[i] for i in frozen]
        # weights the graph holds as attributes are the same tensors on every call: no
        # identity to compare, but their memory, versions and (buffers) values
        self.tensors = self.weights + list(attrs.values())
        self.versioned = [t for t in self.tensors if not t.is_inference()]  # others: no counter
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.versions = [t._version for t in self.versioned]
        self.values = StatsWatch()
        for name, t in attrs.items():
            # buffers by value: BatchNorm statistics among them (which one is, the
            # torch-level graph does not say cheaply); large ones by version only
            if not isinstance(t, torch.nn.Parameter) and t.nbytes <= WATCH_BY_VALUE_BYTES:
                self.values.add(name, t)

    def overlaps(self, full) -> bool:
        """Whether ``full`` passes any of the weight objects this variant froze (the same
        model, maybe changed; none shared: another model's weights)."""
        return any(i < len(full) and full[i] is w for i, w in zip(self.idx, self.weights))

    def fresh(self, full) -> bool:
        if not all(map(operator.is_, map(full.__getitem__, self.idx), self.weights)):
            return False
        if [t.data_ptr() for t in self.tensors] != self.ptrs:
            return False
        if [t._version for t in self.versioned] != self.versions:
            return False
        return self.values.unchanged()


class Compiled:
    def __init__(self, lifted: Lifted, options: Options, weights_getter=None, modes=None):
        self.lifted, self.options = lifted, options
        self.weights_getter = weights_getter  # optimize(): weights are read from the module
        self.modes = modes  # optimize(): () -> the training flags of the module's modules
        self.variants: dict = {}
        self.history = Report()  # refolds and fallbacks across variants
        self.builds = 0  # variants built, rebuilds included
        self.by_structure: dict = {}  # pytree spec of container inputs -> Lifted over leaves
        # 0-d tensor args a graph reads as numbers (``Captured.scalars``): capture bakes
        # their values in, so their values key the variants too. Under dynamic=True Dynamo
        # passes BatchNorm's eps and momentum so (2 per BatchNorm; ~1 us each per call).
        self.scalars: list = []
        self.first_weight = min(lifted.weights) if lifted.weights else None

    def full_args(self, args) -> tuple[list, Any]:
        """(the args the graph takes, the pytree spec of the user args when one of them is a
        container, else None). Dynamo hands the backend flat tensors; ``optimize()``'s
        module may take lists, tuples, dicts, whose leaves become the args."""
        args = list(args)
        if self.weights_getter is None:
            return args, None
        spec = None
        if not all(map(pytree.tree_is_leaf, args)):
            args, spec = pytree.tree_flatten(args)
        return self.weights_getter() + args, spec

    def lifted_for(self, spec) -> Lifted:
        if spec is None:
            return self.lifted
        lifted = self.by_structure.get(spec)
        if lifted is None:
            lifted = self.by_structure[spec] = lift_leaves(self.lifted, spec)
        return lifted

    def __call__(self, *args):
        full, spec = self.full_args(args)
        return self.variant(full, spec).run(full)

    def variant(self, full, spec=None) -> Variant:
        v = self.variants.get(key := self.key(full, spec))
        if v is not None and (v.watch is None or v.watch.fresh(full)):
            return v
        # every variant folded from weights these args share but that changed since goes
        # (not only this key's); variants of other weight sets stay: Dynamo hands two
        # instances of one module class the same graph, so one Compiled serves both
        stale = [k for k, other in self.variants.items()
                 if other.watch is not None and other.watch.overlaps(full)
                 and not other.watch.fresh(full)]
        for k in stale:
            del self.variants[k]
        if stale:
            self.history.record("runtime", "-", "-", "info",
                                "a source weight changed since folding: rebuilt")
        with torch._guards.tracing(None):  # not inside dynamo's tracing context
            v = self.build(full, self.lifted_for(spec), key[2])
        key = self.key(full, spec)  # the build may have found scalars to key by
        self.variants[key] = v
        self._bound_weight_sets(key)
        return v

    def _bound_weight_sets(self, key) -> None:
        """At most ``MAX_WEIGHT_SETS`` variants differing only in their weights (each holds
        its folded, prepacked copy): the oldest goes first, and the history says so."""
        same = [k for k in self.variants if k[:-1] == key[:-1]]
        for k in same[:-MAX_WEIGHT_SETS]:
            del self.variants[k]
            self.history.record("runtime", "-", "-", "info",
                                f"more than {MAX_WEIGHT_SETS} weight sets called this graph: "
                                "the least recently built variant was dropped")
        if len(same) == 2:  # once, when a second weight set appears
            self.history.record("runtime", "-", "-", "info",
                                "another set of weights for this graph (another instance of the "
                                "module: Dynamo shares its graph): a variant of its own, up to "
                                f"{MAX_WEIGHT_SETS}")

    def key(self, full, spec) -> tuple:
        """What decides a variant: the structure of container inputs, grad mode and the
        modules' training flags (both decide freezing; the flags also what the graph
        computes: BatchNorm, dropout), the inputs' signature, and which weights (the first
        weight's identity: two instances of one module class share Dynamo's graph, and
        each gets its variant; the watch still checks every weight). Dynamo guards grad
        mode and training flags itself; optimize() has only this key."""
        modes = self.modes() if self.modes else None
        values = tuple(full[i].item() if i < len(full) and isinstance(full[i], torch.Tensor)
                       else None for i in self.scalars)
        first = self.first_weight
        owner = id(full[first]) if first is not None and first < len(full) else None
        return (spec, torch.is_grad_enabled(), modes, signature(full, self.lifted.weights), values,
                precision.autocast_state(), owner)

    def unoptimized(self, lifted, report, reason, action="info") -> Variant:
        report.record("capture", "-", "-", action, reason)
        return Variant(lambda full: lifted.fn(*full), report)

    def build(self, full, lifted: Lifted, modes=None) -> Variant:
        self.builds += 1
        report = Report()
        eval_mode = modes is not None and not any(modes)
        frozen, why = inference_reason(lifted, full, eval_mode)
        if not frozen:
            return self.unoptimized(lifted, report, why)
        report.record("capture", "-", "-", "info", f"weights frozen: {why}")
        if self.lifted.attrs:
            report.record("capture", "-", "-", "info",
                          f"{len(self.lifted.attrs)} weight(s) are graph attributes (Dynamo "
                          "does that under Inductor's freezing flag or prepare_freezing): "
                          "watched by reference, buffers by value")
        amp = precision.decide(self.options, report)  # before capture: it traces under it
        try:
            cap = capture(lifted, full, freeze=True, autocast=amp)
            if cap.scalars:
                self.scalars = sorted(set(self.scalars) | set(cap.scalars))
                report.record("capture", "-", "-", "info",
                              f"{len(cap.scalars)} 0-d tensor input(s) read as numbers (under "
                              "dynamic=True: module floats such as BatchNorm's eps and "
                              "momentum) specialized by value: another value rebuilds")
            watch = self._watch(full, lifted, cap, report)
            pipeline = run_pipeline
            if self.options.cache_dir:  # after capture and watch: freshness is unchanged
                from fusepass.cache import cached_pipeline as pipeline
            gm = pipeline(cap.gm, self.options, report,
                          recapture=lambda: capture(lifted, full, True, amp).gm)
        except GraphError:
            raise
        except Exception as e:
            return self.unoptimized(lifted, report, f"{type(e).__name__}: {e}; running unoptimized",
                                    "fallback")
        gm.fusepass_report = report
        idx, spec = cap.user_idx, cap.out_spec

        def optimized(full):
            out = gm(*[full[i] for i in idx])
            return out if spec is None else pytree.tree_unflatten(out, spec)

        def run(full):
            try:
                return optimized(full)
            except Exception as e:  # last resort: eager; an error eager shares is the user's
                out = lifted.fn(*full)
                report.record("runtime", "-", "-", "fallback",
                              f"{type(e).__name__}: {e}; this variant now runs unoptimized")
                v.run, v.checked, v.gm = (lambda f: lifted.fn(*f)), True, None
                return out

        v = Variant(run, report, gm, watch=watch)
        if self.options.check:
            v.run, v.checked = self._checked(lifted, v, run, idx, set(watch.idx), amp), False
        return v

    @staticmethod
    def _watch(full, lifted, cap, report) -> Watch:
        """The variant's watch: the weights it froze, graph attributes but those its graph
        writes, BatchNorm statistics by value. Weights the graph writes are state: they
        stay inputs, neither frozen nor watched (a training-mode BatchNorm under no_grad
        would otherwise be rebuilt on every call: each call changes its statistics)."""
        frozen = [i for i in lifted.weights if i not in cap.state]
        watch = Watch(full, frozen, {k: t for k, t in lifted.attrs.items()
                                     if k not in cap.state_attrs})
        for i in bn_statistics(cap.gm, lifted.weights):
            watch.values.add(i, full[i])
        whys: dict = {}
        for i, why in cap.state.items():
            whys.setdefault(why, []).append(lifted.weights[i])
        for name, why in cap.state_attrs.items():
            whys.setdefault(why, []).append(name)
        for why, names in whys.items():
            report.record("capture", "-", "-", "info",
                          f"{why}: not folded; {', '.join(names)} stay graph inputs, not "
                          "frozen and not watched (state, not constants)")
        return watch

    def _checked(self, lifted, v, run, idx, frozen, compute_dtype=None):
        def pristine(full):  # eager and the localizer must not mutate the user's inputs
            return [a.clone() if isinstance(a, torch.Tensor) and i not in frozen else a
                    for i, a in enumerate(full)]

        def first_call(full):
            with torch.no_grad():
                want = lifted.fn(*pristine(full))
            local = pristine(full)
            out = run(full)
            check_variant(v.gm, [local[i] for i in idx], out, want, compute_dtype)
            v.run, v.checked = run, True
            return out
        return first_call
