"""``fusepass.quantize``: post-training static INT8 quantization with the standard PT2E
flow (torchao's ``prepare_pt2e``/``convert_pt2e`` with ``X86InductorQuantizer``), ready for
``torch.compile(backend="fusepass")`` or ``fusepass.optimize``.

What it adds to the flow a user could write themselves:
  * ``reduce_range`` is chosen for the CPU: without VNNI, oneDNN's u8*s8 kernels saturate
    int16 pair sums for activations above 127 (measured: up to ~20 % error on a conv),
    so activations are quantized to 0..127 there (torchao's documented remedy), and to
    0..255 where VNNI/AMX accumulate in int32;
  * ``max_error=``: accuracy-aware, like Intel Neural Compressor's "basic" strategy: quantize
    everything; while the relative output error against fp32 (on the calibration batches,
    or ``eval_fn``) exceeds the budget, return the most sensitive remaining layer to fp32.
    Sensitivity is measured (the error with only that layer quantized), not guessed;
  * the process-wide side effect of importing torchao's quantizer
    (``torch._inductor.config.pre_grad_custom_pass = quant_lift_up``) is undone, so the
    user's other Inductor compiles are not changed by calling this.
The result carries ``fusepass_quantization``: per layer its precision and why.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

EXTRA = "fusepass.quantize needs torchao (pip install 'fusepass[int8]', torchao==0.18.0)"


def _torchao():
    import torch._inductor.config as inductor_config
    saved = inductor_config.pre_grad_custom_pass
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise ImportError(f"{EXTRA} ({e})") from e
    finally:  # importing the quantizer sets Inductor's pre-grad pass process-wide
        inductor_config.pre_grad_custom_pass = saved
    return prepare_pt2e, convert_pt2e, xiq


@dataclass
class QuantizationReport:
    reduce_range: bool
    why_reduce_range: str
    layers: dict = field(default_factory=dict)  # module name -> "int8" | "fp32: why"
    error: Optional[float] = None  # relative output error vs fp32 on the calibration data
    max_error: Optional[float] = None

    def __str__(self):
        lines = [f"reduce_range={self.reduce_range} ({self.why_reduce_range})"]
        if self.error is not None:
            lines.append(f"relative error {self.error:.4g}" + (
                f" (budget {self.max_error:g})" if self.max_error is not None else ""))
        lines += [f"  {name}: {p}" for name, p in self.layers.items()]
        return "\n".join(lines)


def _args(batch):
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _flat(out):
    leaves = torch.utils._pytree.tree_leaves(out)
    return torch.cat([t.detach().float().reshape(-1) for t in leaves if isinstance(t, torch.Tensor)])


def relative_error(model, reference_outputs, batches) -> float:
    """max over batches of ||model(b) - ref|| / ||ref||."""
    worst = 0.0
    with torch.no_grad():
        for b, ref in zip(batches, reference_outputs):
            got = _flat(model(*_args(b)))
            worst = max(worst, float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


def quantizable_layers(model) -> list[str]:
    """Names of the conv/linear modules the quantizer annotates."""
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def separate_shared_calls(gm: torch.fx.GraphModule) -> None:
    """torch 2.13's export leaves ``source_fn_stack`` unset, and ``get_source_partitions``
    then groups nodes by their innermost module's name: one ``nn.ReLU`` called three times
    (torchvision's ResNet blocks share ``self.relu``) becomes one partition with three
    outputs, which X86InductorQuantizer rejects ("Input partition has more than one output
    node"). Each call (a connected group of a module's nodes) of a module called more than
    once gets its own innermost name, ``relu#0``, ``relu#1``, ... (``skip`` names such a
    module by its plain name: all its calls)."""
    groups: dict = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if n.op == "call_function" and "source_fn_stack" not in n.meta and stack:
            fqn, cls = list(stack.values())[-1]
            groups.setdefault((fqn, cls), []).append(n)
    for (fqn, cls), nodes in groups.items():
        parent = {n: n for n in nodes}

        def find(n):
            while parent[n] is not n:
                n = parent[n]
            return n
        for n in nodes:
            for a in n.all_input_nodes:
                if a in parent:
                    parent[find(a)] = find(n)
        roots = list(dict.fromkeys(find(n) for n in nodes))
        if len(roots) == 1:
            continue
        for n in nodes:
            stack = dict(n.meta["nn_module_stack"])
            key = list(stack)[-1]
            stack[key] = (f"{fqn}#{roots.index(find(n))}", cls)
            n.meta["nn_module_stack"] = stack


def functional_inplace(gm: torch.fx.GraphModule) -> None:
    """``torch.export`` keeps in-place ops (``nn.ReLU(inplace=True)`` -> ``relu_``,
    ``out += identity`` -> ``add_``), and X86InductorQuantizer annotates only their
    functional forms: a torchvision-style ResNet came out with no quantize op at all.
    An in-place op whose mutated input nobody reads afterwards computes what its
    functional twin computes; those are swapped (the others are left as they are)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        name = n.target._schema.name.split("::")[-1]
        if not name.endswith("_") or name.startswith("_") or not n.args:
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        twin = getattr(packet, n.target._overloadname, None) if packet is not None else None
        target = n.args[0]
        if twin is None or not isinstance(target, torch.fx.Node) or target.op == "placeholder":
            continue
        if any(order[u] > order[n] for u in target.users if u is not n):
            continue
        n.target = twin
    gm.recompile()


def quantize(model: torch.nn.Module, calibration: Iterable, *, per_channel: bool = True,
             dynamic: bool = False, reduce_range: Optional[bool] = None,
             max_error: Optional[float] = None, eval_fn: Optional[Callable] = None,
             skip: Iterable[str] = ()) -> torch.fx.GraphModule:
    """Quantize ``model`` (eval mode, float32) to INT8 with PT2E + X86InductorQuantizer
    defaults; returns the converted GraphModule (run it through fusepass to get int8
    kernels). ``calibration``: batches (a tensor or a tuple of inputs each), the first
    also the export example. ``skip``: module names kept in fp32. ``max_error``: the
    largest relative output error accepted (``eval_fn(quantized) -> error`` replaces the
    calibration-batch measure when given)."""
    if not per_channel:
        raise ValueError("fusepass.quantize: per_channel=False (per-tensor weights) has no "
                         "int8 kernel row in fusepass; oneDNN's int8 weights are per channel")
    if max_error is not None and not (isinstance(max_error, (int, float)) and max_error > 0):
        raise ValueError(f"max_error={max_error!r}; valid: a positive number")
    batches = list(calibration)
    if not batches:
        raise ValueError("fusepass.quantize needs at least one calibration batch")
    prepare_pt2e, convert_pt2e, xiq = _torchao()
    from fusepass.patterns.quantized import vnni
    if reduce_range is None:
        reduce_range = not vnni()
        why = ("CPU lacks VNNI: activations 0..127, or oneDNN's int16 pair sums saturate"
               if reduce_range else "CPU has VNNI/AMX: full-range activations")
    else:
        why = "given"
    model = model.eval()
    example = _args(batches[0])
    with torch.no_grad():
        ref = [_flat(model(*_args(b))) for b in batches]
    exported = torch.export.export(model, example).module()
    functional_inplace(exported)
    separate_shared_calls(exported)
    layers = quantizable_layers(model)

    def build(fp32_layers):
        q = xiq.X86InductorQuantizer()
        q.set_global(xiq.get_default_x86_inductor_quantization_config(
            is_dynamic=dynamic, reduce_range=reduce_range))
        for name in fp32_layers:
            q.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(copy.deepcopy(exported), q)
        with torch.no_grad():
            for b in batches:
                prepared(*_args(b))
        return convert_pt2e(prepared)

    def error(qm):
        return eval_fn(qm) if eval_fn is not None else relative_error(qm, ref, batches)

    fp32 = {n: "fp32: named in skip" for n in skip}
    qm = build(list(fp32))
    report = QuantizationReport(reduce_range, why, max_error=max_error)
    err = error(qm)
    if max_error is not None and err > max_error:
        # sensitivity: the error of quantizing that layer alone, everything else fp32
        candidates = [n for n in layers if n not in fp32]
        sens = {}
        for n in candidates:
            sens[n] = error(build([m for m in layers if m != n]))
        for n in sorted(candidates, key=lambda n: -sens[n]):
            if err <= max_error:
                break
            fp32[n] = (f"fp32: most sensitive remaining layer (error {sens[n]:.3g} quantized "
                       f"alone), returned to fp32 to meet max_error={max_error:g}")
            qm = build(list(fp32))
            err = error(qm)
    report.error = err
    report.layers = {n: fp32.get(n, "int8") for n in layers}
    qm.fusepass_quantization = report
    return qm
