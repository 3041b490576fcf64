"""The configurations the bench compares: name -> how to turn (model, inputs) into a
callable, and in which Python environment that runs.

Why a table: one place says exactly what "Inductor with freezing" or "IPEX" means here,
so the numbers can be reproduced by hand. Every ``make`` runs in a fresh worker process
(bench/measure.py) under ``torch.no_grad()``, on a model the worker built itself; it
returns ``(fn, info)`` where ``fn(*inputs)`` is what gets timed (the first call is the
compile) and ``info`` is recorded in the results. All configs get the same contiguous
NCHW / token-id inputs: a config that wants another layout converts inside ``fn``.

This module is imported by workers in the IPEX environment (torch 2.8) too: nothing in
it may need a newer torch at import time.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Config:
    name: str
    env: str  # "main" (this venv, torch 2.13) or "ipex" (the IPEX venv, torch 2.8)
    description: str
    make: Callable  # (model, inputs) -> (fn, info)
    applies: Callable = lambda spec: None  # (ModelSpec) -> reason it does not apply, or None


# ------------------------------------------------------------------ freezing check
class FreezeProbe:
    """Counts calls of Inductor's ``torch._inductor.freezing.freeze`` and how many graph
    inputs (parameters/buffers) it turned into constants. Inductor imports ``freeze``
    inside ``fw_compiler_freezing`` at call time, so patching the module attribute sees
    every call (torch 2.8 and 2.13). pytorch#125474: a config knob that silently does
    nothing is only caught by looking."""

    def __init__(self):
        self.calls, self.inputs, self.constants = 0, 0, 0

    def install(self):
        import torch._inductor.freezing as freezing
        orig = freezing.freeze
        if getattr(orig, "_bench_probe", None) is not None:
            orig = orig._bench_probe_orig

        def freeze(dynamo_gm, aot_gm, example_inputs, *a, **kw):
            opt, preserved = orig(dynamo_gm, aot_gm, example_inputs, *a, **kw)
            self.calls += 1
            self.inputs += len(example_inputs)
            self.constants += len(example_inputs) - len(preserved)
            return opt, preserved

        freeze._bench_probe, freeze._bench_probe_orig = self, orig
        freezing.freeze = freeze
        return self

    def info(self, expect: bool) -> dict:
        ran = self.calls > 0 and self.constants > 0
        return {"freezing_ran": ran, "freeze_calls": self.calls,
                "frozen_constants": self.constants, "freeze_graph_inputs": self.inputs,
                "freezing_verified": ran == expect}


def _dynamo_info() -> dict:
    """Graphs, graph breaks, and how the compile time splits: ``backend_s`` is the time in
    the backend (Dynamo's ``OutputGraph.call_user_compiler``: for Inductor AOTAutograd +
    freezing + codegen + C++ builds, for fusepass capture + passes + lowering); the rest
    of the first call is Dynamo's own bytecode tracing and guards, the same for everyone."""
    from torch._dynamo import utils
    info = {"dynamo_graphs": int(utils.counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(utils.counters["graph_break"].values()))}
    times = getattr(utils, "compilation_time_metrics", {})
    if times.get("OutputGraph.call_user_compiler"):
        info["backend_s"] = float(sum(times["OutputGraph.call_user_compiler"]))
    if times.get("_compile.compile_inner"):
        info["dynamo_compile_s"] = float(sum(times["_compile.compile_inner"]))
    return info


def _compiled(model, backend="inductor", freezing=False, prepare=None):
    """torch.compile with Inductor's freezing flag set the way that works
    (``torch._inductor.config.freezing``; ``options={"freezing": True}`` was seen to do
    nothing) and the freeze probe installed. Returns (fn, info_fn)."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = freezing
    probe = FreezeProbe().install()
    compiled = torch.compile(model, backend=backend)

    def info():
        d = {**probe.info(expect=freezing), **_dynamo_info()}
        if freezing and not d["freezing_ran"]:
            d["warning"] = "freezing was requested but Inductor did not freeze any weight"
        if not freezing and d["freezing_ran"]:
            d["warning"] = "freezing ran although it was not requested"
        return d

    return compiled, info


# ------------------------------------------------------------------------ configs
def make_eager(model, inputs):
    return model, {}


def make_eager_channels_last(model, inputs):
    model = model.to(memory_format=torch.channels_last)

    def fn(x):
        return model(x.contiguous(memory_format=torch.channels_last))

    return fn, {"note": "weights and input channels_last; input conversion is timed"}


def make_inductor(model, inputs):
    fn, info = _compiled(model, freezing=False)
    return fn, info


def make_inductor_freezing(model, inputs):
    fn, info = _compiled(model, freezing=True)
    return fn, info


def make_fusepass(model, inputs):
    fn = torch.compile(model, backend="fusepass")  # entry point: no import needed
    return fn, _dynamo_info


def _dynamo_graph(gm, example_inputs):
    """The backend that compiles nothing: Dynamo's captured graph runs as it is."""
    return gm.forward


def make_dynamo_only(model, inputs):
    """torch.compile with a backend that returns Dynamo's graph unchanged: what every
    torch.compile backend pays before and around its own work (bytecode tracing with fake
    tensors, guards on every call). Its compile time is the floor of any backend's, and
    its latency is eager's plus Dynamo's per-call overhead."""
    fn = torch.compile(model, backend=_dynamo_graph)
    return fn, _dynamo_info


def make_ipex_jit(model, inputs):
    """IPEX's fastest fp32 path (IPEX_ENV.md): ipex.optimize with sample_input, then
    torch.jit.trace + torch.jit.freeze. On a deep copy: ipex.optimize changes the original
    model's weight layout even with inplace=False."""
    import intel_extension_for_pytorch as ipex
    m = ipex.optimize(copy.deepcopy(model).eval(), dtype=torch.float32,
                      sample_input=tuple(inputs) if len(inputs) > 1 else inputs[0])
    traced = torch.jit.trace(m, tuple(inputs), check_trace=False, strict=False)
    traced = torch.jit.freeze(traced)
    return traced, {"ipex": ipex.__version__}


def make_ipex_backend(model, inputs):
    """IPEX's documented torch.compile recipe, ipex.optimize(weights_prepack=False) then
    backend="ipex" (Inductor with IPEX lowerings), with Inductor freezing on."""
    import intel_extension_for_pytorch as ipex
    m = ipex.optimize(copy.deepcopy(model).eval(), dtype=torch.float32, weights_prepack=False)
    fn, info = _compiled(m, backend="ipex", freezing=True)
    return fn, lambda: {**info(), "ipex": ipex.__version__}


# -------------------------------------------------------------- peers (not torch.compile)
# OpenVINO and ONNX Runtime compile a whole graph ahead of time and run it on numpy
# arrays. Every peer gets 2 threads (like torch.set_num_threads(2)) and must not spin
# while idle: workers stay alive between rounds while another config is timed, and a
# spinning idle worker would steal a core from it (bench/README.md, "Peers").
OPENVINO_PIN = "openvino==2026.4.1"
PEER_PACKAGES = {"openvino": OPENVINO_PIN, "onnxruntime": "onnxruntime onnx onnxscript",
                 "nncf": "nncf==3.4.0", "torchao": "torchao==0.18.0"}


def _peer_missing(*modules: str) -> Optional[str]:
    """Why a peer config cannot run in this interpreter (checked in the parent, which is
    the main env's interpreter too), or None. A missing peer becomes a ``skipped`` row."""
    import importlib.util
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            top = modules[0]
            return (f"{mod} not installed: pip install {PEER_PACKAGES.get(top, mod)} torch==2.13.0 "
                    f"(or make setup: the bench extra has it)")
    return None


def _numpy_inputs(inputs):
    """Contiguous numpy views of the (CPU, contiguous) torch inputs: no copy."""
    return [t.detach().contiguous().numpy() for t in inputs]


def _torch_outputs(arrays):
    """numpy outputs -> torch tensors (no copy): one tensor, or a tuple like the model's
    (the harness compares leaves in order, tests/test_bench_smoke.py checks the count)."""
    outs = tuple(torch.from_numpy(a) for a in arrays)
    return outs[0] if len(outs) == 1 else outs


OPENVINO_CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": 2}


def _ov_type_name(t) -> str:
    """``ov.Type`` -> "f32" (its str() is "<Type: 'float32'>")."""
    return t.get_type_name() if hasattr(t, "get_type_name") else str(t)


def make_openvino(model, inputs):
    """``ov.convert_model(model, example_input=...)`` (TorchScript/FX frontend inside
    OpenVINO) then ``Core().compile_model(m, "CPU", f32, LATENCY, 2 threads)``. ``fn``
    converts torch -> numpy (views) and back, so that conversion is timed; outputs are
    copied out of OpenVINO's buffers (``share_outputs=False``), as eager allocates its
    own."""
    return _openvino(model, inputs, OPENVINO_CPU_CONFIG)


def _openvino(model, inputs, config, transform=None):
    """Convert, optionally ``transform`` the OpenVINO model (NNCF's quantization), compile
    for the CPU with ``config`` and one infer request."""
    import openvino as ov
    example = tuple(inputs) if len(inputs) > 1 else inputs[0]
    ov_model = ov.convert_model(model, example_input=example)
    info = {"openvino": ov.__version__}
    if transform is not None:
        ov_model, extra = transform(ov_model)
        info.update(extra)
    cfg = dict(config, INFERENCE_NUM_THREADS=torch.get_num_threads())
    compiled = ov.Core().compile_model(ov_model, "CPU", cfg)
    request = compiled.create_infer_request()

    def fn(*xs):
        res = request.infer(_numpy_inputs(xs), share_inputs=True, share_outputs=False)
        return _torch_outputs(res.to_tuple())

    info.update({"ov_config": cfg,
                 "ov_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                 "ov_precision": _ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))})
    return fn, info


def make_openvino_torch_compile(model, inputs):
    """OpenVINO's ``torch.compile(backend="openvino")``, same CPU options. Kept as a row of
    its own so that its status shows in the table: on torch 2.13 it fails with
    ``sources must not be empty for symbol`` (an error row, not a hidden omission)."""
    import openvino.torch  # noqa: F401  (registers the backend)
    cfg = {"device": "CPU", "config": {k: str(v) for k, v in OPENVINO_CPU_CONFIG.items()}}
    fn = torch.compile(model, backend="openvino", options=cfg)
    return fn, _dynamo_info


def make_onnxruntime(model, inputs):
    """``torch.onnx.export`` (torch's default exporter: torch.export + onnxscript) to a temp
    file, then an ``onnxruntime.InferenceSession`` on CPUExecutionProvider with
    ORT_ENABLE_ALL, 2 intra-op threads and intra-/inter-op spinning off. The file is
    deleted once the session holds the model."""
    import os
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as d:
        path = os.path.join(d, "model.onnx")
        torch.onnx.export(model, tuple(inputs), path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        onnx_mb = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX graph takes {names}, the model {len(inputs)} inputs")

    def fn(*xs):
        return _torch_outputs(sess.run(None, dict(zip(names, _numpy_inputs(xs)))))

    info = {"onnxruntime": ort.__version__, "providers": sess.get_providers(),
            "onnx_mb": round(onnx_mb, 1), "ort_threads": so.intra_op_num_threads}
    return fn, info


# ------------------------------------------------------------------- bf16 (issue 18)
# bf16 is only worth timing where the CPU computes it natively (avx512bw/vl/dq with
# avx512_bf16, avx_ne_convert, AMX): elsewhere every runtime converts through fp32 and
# is slower than fp32, and oneDNN's bf16 kernels raise. The rows are decided in the
# parent (``applies``): on such a CPU they are skip rows saying so, no worker starts.
def _native_bf16(spec) -> Optional[str]:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("CPU lacks native bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is "
                "False: no avx512bw/vl/dq, avx_ne_convert or AMX)")
    return None


def make_fusepass_bf16(model, inputs):
    """fusepass with ``precision="bf16"``: conv/linear regions in bf16 (autocast's policy),
    bf16 weights cast and prepacked at compile time, fp32 at the graph's edges."""
    fn = torch.compile(model, backend="fusepass", options={"precision": "bf16"})
    return fn, lambda: {"precision": "bf16", **_dynamo_info()}


def make_inductor_bf16(model, inputs):
    """Inductor's bf16 recipe: ``torch.autocast("cpu", torch.bfloat16)`` around the call
    of a model compiled with freezing on (the compile happens in the first, autocast
    call); its outputs are bf16 where autocast leaves them so."""
    compiled, info = _compiled(model, freezing=True)

    def fn(*xs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(*xs)

    return fn, lambda: {**info(), "autocast": "bf16"}


def make_openvino_bf16(model, inputs):
    """``make_openvino`` with ``INFERENCE_PRECISION_HINT=bf16`` (the info's
    ``ov_precision`` says what OpenVINO's CPU plugin really chose)."""
    return _openvino(model, inputs, dict(OPENVINO_CPU_CONFIG, INFERENCE_PRECISION_HINT="bf16"))


# ------------------------------------------------------------------------------ INT8
# One converted graph for every int8 row: fusepass.quantize (torchao 0.18 PT2E,
# X86InductorQuantizer defaults; reduce_range chosen for the CPU) on 4 calibration batches
# (the bench input and 3 perturbed copies). The quantization is the user's step, not the
# compile: it happens in ``make`` (timed as part of compile_s; ``quantize_s`` says how much).
# ``err_vs_converted``: relative L2 error against the converted graph run eagerly (what the
# int8 kernels should reproduce), the accuracy target of issue 15.
def _calibration(inputs, n=4):
    g = torch.Generator().manual_seed(1234)
    batches = [tuple(inputs)]
    for _ in range(n - 1):
        batches.append(tuple(t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point()
                             else t for t in inputs))
    return batches


def _converted(model, inputs, dynamic=False):
    import time

    import fusepass
    t0 = time.perf_counter()
    qm = fusepass.quantize(model, _calibration(inputs), dynamic=dynamic)
    return qm, {"quantize_s": round(time.perf_counter() - t0, 2),
                "reduce_range": qm.fusepass_quantization.reduce_range}


def _rel(a, b):
    a, b = [torch.utils._pytree.tree_leaves(t)[0].float() for t in (a, b)]
    return float((a - b).norm() / b.norm())


def _int8_info(qm, fn, inputs, base):
    def info():
        with torch.no_grad():
            err = _rel(fn(*inputs), qm(*inputs))
        extra = base() if callable(base) else base
        return {**extra, "err_vs_converted": err}
    return info


def make_fusepass_int8(model, inputs, dynamic=False):
    """``dynamic``: ``fusepass.quantize(..., dynamic=True)``, activation scales computed
    per call (the linears' row ``int8.qlinear.dynamic``; conv nets' convs, which no int8
    conv row takes then, run in float)."""
    qm, q = _converted(model, inputs, dynamic=dynamic)
    fn = torch.compile(qm, backend="fusepass")
    # what bench/measure.py explains (not Module.__setattr__: that would make qm a
    # submodule of the compiled wrapper, which forwards attributes to qm itself)
    object.__setattr__(fn, "bench_source_model", qm)
    return fn, _int8_info(qm, fn, inputs, lambda: {**q, **_dynamo_info()})


def make_inductor_int8(model, inputs):
    """The same converted graph through Inductor with freezing (its int8 lowering needs
    it) and torchao's pre-grad pass (``quant_lift_up``, which importing torchao's quantizer
    installs and fusepass.quantize undoes)."""
    qm, q = _converted(model, inputs)
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.inductor_passes.x86 import quant_lift_up
    inductor_config.pre_grad_custom_pass = quant_lift_up
    fn, info = _compiled(qm, freezing=True)
    return fn, _int8_info(qm, fn, inputs, lambda: {**q, **info()})


def make_openvino_int8(model, inputs):
    """NNCF's post-training quantization of the converted OpenVINO model on the same
    calibration batches (``nncf.quantize``, default preset), compiled as ``openvino``.
    Its error columns are against fp32 eager, like every row's: NNCF is another quantizer,
    so there is no converted graph of its own to reproduce (no ``err_vs_converted``)."""
    def quantize(ov_model):
        import nncf
        calib = [_numpy_inputs(b) for b in _calibration(inputs)]
        data = nncf.Dataset(calib, lambda b: b if len(b) > 1 else b[0])
        return nncf.quantize(ov_model, data), {"nncf": nncf.__version__}
    return _openvino(model, inputs, OPENVINO_CPU_CONFIG, transform=quantize)


def _cnn_only(spec) -> Optional[str]:
    return None if spec.kind == "cnn" else "channels_last does not apply (no 4-D activations)"


CONFIGS = {c.name: c for c in [
    Config("eager", "main", "eager PyTorch, torch.no_grad()", make_eager),
    Config("eager_cl", "main", "eager, model and input in channels_last", make_eager_channels_last,
           _cnn_only),
    Config("inductor", "main", "torch.compile (Inductor, default mode, freezing off)",
           make_inductor),
    Config("inductor_freezing", "main",
           "torch.compile (Inductor) with torch._inductor.config.freezing = True",
           make_inductor_freezing),
    Config("fusepass", "main", 'torch.compile(backend="fusepass")', make_fusepass),
    Config("dynamo_only", "main",
           "torch.compile with a backend that returns Dynamo's graph as it is: the floor of "
           "any backend's compile time and per-call overhead", make_dynamo_only),
    Config("eager_ipexenv", "ipex", "eager PyTorch in the IPEX env (torch 2.8): IPEX's baseline",
           make_eager),
    Config("ipex_jit", "ipex", "ipex.optimize(sample_input=) + torch.jit.trace + jit.freeze",
           make_ipex_jit),
    Config("ipex_backend", "ipex",
           'ipex.optimize(weights_prepack=False) + torch.compile(backend="ipex"), freezing on',
           make_ipex_backend),
    Config("openvino", "main",
           'ov.convert_model(example_input=) + Core().compile_model("CPU", f32, LATENCY, 2 threads)',
           make_openvino, lambda spec: _peer_missing("openvino")),
    Config("openvino_torch_compile", "main",
           'torch.compile(backend="openvino"), CPU, f32, LATENCY, 2 threads (fails on torch 2.13)',
           make_openvino_torch_compile, lambda spec: _peer_missing("openvino")),
    Config("onnxruntime", "main",
           "torch.onnx.export + onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL, 2 threads, "
           "no spinning", make_onnxruntime, lambda spec: _peer_missing("onnxruntime", "onnx",
                                                                        "onnxscript")),
    Config("fusepass_bf16", "main",
           'torch.compile(backend="fusepass", options={"precision": "bf16"})',
           make_fusepass_bf16, _native_bf16),
    Config("inductor_bf16", "main",
           'torch.autocast("cpu", bfloat16) around torch.compile (Inductor), freezing on',
           make_inductor_bf16, _native_bf16),
    Config("openvino_bf16", "main",
           'openvino with INFERENCE_PRECISION_HINT=bf16 (else as the openvino row)',
           make_openvino_bf16, lambda spec: _native_bf16(spec) or _peer_missing("openvino")),
    Config("fusepass_int8", "main",
           'fusepass.quantize (PT2E, X86InductorQuantizer) + torch.compile(backend="fusepass")',
           make_fusepass_int8, lambda spec: _peer_missing("torchao")),
    Config("fusepass_int8_dynamic", "main",
           "fusepass.quantize(dynamic=True) (per-call activation scales) + backend=fusepass",
           functools.partial(make_fusepass_int8, dynamic=True),
           lambda spec: _peer_missing("torchao")),
    Config("inductor_int8", "main",
           "the same converted graph + torch.compile (Inductor, freezing, torchao's quant_lift_up)",
           make_inductor_int8, lambda spec: _peer_missing("torchao")),
    Config("openvino_int8", "main",
           "ov.convert_model + nncf.quantize (same calibration batches) + compile_model as openvino",
           make_openvino_int8, lambda spec: _peer_missing("openvino", "nncf")),
]}
# The bf16 rows are in the default run: on a CPU without native bf16 they are skip rows
# decided before any worker starts (free), and there the table must say why bf16 has no
# number; on a native-bf16 CPU they add three timed configs per (model, batch).
# The int8 rows quantize every model (~30 s for ResNet-50): `python -m bench --configs` them.
BF16_CONFIGS = ["fusepass_bf16", "inductor_bf16", "openvino_bf16"]
INT8_CONFIGS = ["fusepass_int8", "fusepass_int8_dynamic", "inductor_int8", "openvino_int8"]
DEFAULT_CONFIGS = [c for c in CONFIGS if c not in INT8_CONFIGS]
# Inductor's cold compile of even the tiny net takes 20-45 s here: not in the CI smoke
# (tests/test_bench_smoke.py has an opt-in test that adds it).
SMOKE_CONFIGS = ["eager", "eager_cl", "fusepass", "dynamo_only"]
REFERENCE = "inductor_freezing"  # the config fusepass's targets are measured against
