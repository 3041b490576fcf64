"""End to end, as users call it: torch.compile(backend="fusepass"), optimize, explain."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fusepass
from bench import zoo as models
from tests.util import assert_close, histogram, optimize


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# the block's fusions: GELU into fc1, the residual x + fc2(.) into fc2 (binary post-op)
MLP_COUNTS = {"linear.gelu": 1, "linear.add": 1}


class MLPBlock(torch.nn.Module):
    """A transformer MLP block: LN -> Linear -> GELU -> Linear, residual."""

    def __init__(self, d=32, h=64, approximate="none"):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.approximate = approximate

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x)), approximate=self.approximate))


def test_resnet_style_net_through_the_backend():
    m = models.build("resnet18")
    x = models.example_input("resnet18", 2, resolution=64)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="fusepass")(x)
    assert want.std() > 0.05
    assert_close(got, want)
    rep = fusepass.explain(m, x)
    assert rep.counts.get("conv2d.relu", 0) >= 8, rep.summary()
    assert rep.kernels.get("mkldnn._convolution_pointwise", 0) >= 10


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_transformer_mlp_block_through_the_backend(approximate):
    torch.manual_seed(0)
    m = MLPBlock(approximate=approximate).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = torch.compile(m, backend="fusepass")(x)
    assert_close(got, m(x))
    rep = fusepass.explain(m, x)
    gelu = "linear.gelu" if approximate == "none" else "linear.gelu_tanh"
    assert rep.counts == {gelu: 1, "linear.add": 1}
    assert rep.kernels == {"mkldnn._linear_pointwise": 1, "mkldnn._linear_pointwise.binary": 1}


def test_no_grad_inside_the_compiled_function_is_seen():
    """pytorch#125474: no_grad entered inside the compiled function still freezes."""
    torch.manual_seed(0)
    m = MLPBlock().eval()

    def f(x):
        with torch.no_grad():
            return m(x)

    x = torch.randn(2, 7, 32)
    seen = []

    def spy(gm, example_inputs):
        from fusepass.backend import fusepass_backend
        c = fusepass_backend(gm, example_inputs)
        seen.append(c)
        return c

    got = torch.compile(f, backend=spy)(x)
    assert_close(got, m(x))
    reports = [v.report for c in seen for v in c.variants.values()]
    assert any(r.counts.get("linear.gelu") == 1 for r in reports), [r.summary() for r in reports]


def test_inference_mode_outside():
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    with torch.inference_mode():
        got = torch.compile(m, backend="fusepass")(x)
        want = m(x)
    assert_close(got, want)


def test_training_mode_runs_unfused_with_gradients():
    torch.manual_seed(0)
    m = MLPBlock()
    ref = MLPBlock()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 32)
    out = torch.compile(m, backend="fusepass")(x)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    assert_close(out, ref(x))
    torch.testing.assert_close(m.fc1.weight.grad, ref.fc1.weight.grad)
    gm = fusepass.optimize(torch.fx.symbolic_trace(MLPBlock().train()), [x])
    assert any("requires grad" in d.reason for d in gm.fusepass_report.decisions)
    assert gm.fusepass_report.counts == {}


def test_optimize_returns_a_runnable_graph_module_with_report():
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    gm = optimize(m, [x])
    assert isinstance(gm, torch.fx.GraphModule)
    h = histogram(gm)
    assert h["mkldnn._linear_pointwise"] == 1 and h["mkldnn._linear_pointwise.binary"] == 1
    with torch.no_grad():
        assert_close(gm(x), m(x))
        x2 = torch.randn(5, 3, 32)  # another signature: another variant, still right
        assert_close(gm(x2), m(x2))
    text = str(gm.fusepass_report)
    assert "linear.gelu" in text and "rewritten" in text


def test_report_table_and_counts():
    torch.manual_seed(0)
    m = MLPBlock().eval()
    rep = fusepass.explain(m, torch.randn(2, 7, 32))
    assert isinstance(rep, fusepass.Report)
    lines = str(rep).splitlines()
    assert lines[0].split()[:5] == ["stage", "rule", "node", "action", "reason"]
    assert rep.counts == MLP_COUNTS


# --- options ---------------------------------------------------------------------------

def test_unknown_option_is_an_error_listing_valid_ones():
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    with pytest.raises(fusepass.OptionError, match="valid options: .*lowering"):
        optimize(m, [x], lowerng="onednn")
    with pytest.raises(fusepass.OptionError, match="valid options"):
        fusepass.explain(m, x, bogus=1)
    with pytest.raises(Exception, match="valid options"):
        with torch.no_grad():
            torch.compile(m, backend="fusepass", options={"bogus": 1})(x)
    with pytest.raises(fusepass.OptionError, match="names no pass or pattern"):
        optimize(m, [x], disable=["linear.gleu"])
    with pytest.raises(fusepass.OptionError, match="lowering="):
        optimize(m, [x], lowering="cuda")


def test_disable_a_pattern_or_a_pass_by_name():
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    assert optimize(m, [x], disable=["linear.gelu"]).fusepass_report.counts == {"linear.add": 1}
    assert optimize(m, [x], disable="linear.*").fusepass_report.counts == {}
    assert optimize(m, [x], disable=["fuse"]).fusepass_report.counts == {}
    with torch.no_grad():
        c = torch.compile(m, backend="fusepass", options={"disable": ["linear.gelu"]})
        assert_close(c(x), m(x))


def test_reference_lowering_is_plain_aten():
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    gm = optimize(m, [x], lowering="reference")
    h = histogram(gm)
    assert not [k for k in h if k.startswith(("mkldnn.", "fusepass."))], h
    assert h["aten.linear"] == 2 and h["aten.gelu"] == 1
    with torch.no_grad():
        assert_close(gm(x), m(x))


# --- what fusepass cannot optimize still runs, correctly --------------------------------

class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return y[y > 0.1].sum()  # output shape depends on data: no static capture


@pytest.mark.expect_fallback(r"^capture: DynamicOutputShapeException")
def test_capture_failure_falls_back_and_says_so():
    torch.manual_seed(0)
    m = DataDependent().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = optimize(m, [x])
    assert gm.fusepass_report.fell_back
    (d,) = gm.fusepass_report.where(action="fallback")
    assert d.stage == "capture" and "aten.nonzero" in d.reason and "running unoptimized" in d.reason, d
    with torch.no_grad():
        assert_close(gm(x), m(x))


@pytest.mark.expect_fallback(r"^broken: RuntimeError: boom \(pass undone\)$")
def test_an_exception_in_a_pass_is_contained(monkeypatch):
    import fusepass.pipeline as pipeline

    def broken(gm, *, options, report):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "STAGES", [("broken", broken)] + pipeline.STAGES)
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    gm = optimize(m, [x])
    errors = gm.fusepass_report.where(action="error")
    assert [e.stage for e in errors] == ["broken"] and "boom" in errors[0].reason, errors
    assert gm.fusepass_report.counts == MLP_COUNTS
    with torch.no_grad():
        assert_close(gm(x), m(x))


def _corrupting(gm, *, options, report):
    """A pass that breaks the graph halfway, then raises: every call_function's output
    is cut off from its users before the exception."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.users:
            n.replace_all_uses_with(next(iter(gm.graph.nodes)))
            break
    gm.recompile()
    raise RuntimeError("halfway")


@pytest.mark.expect_fallback(r"^corrupting: RuntimeError: halfway \(pass undone\)$")
@pytest.mark.parametrize("where", ["before fuse", "after lowering"])
def test_a_pass_failing_halfway_is_undone_and_the_rest_still_runs(monkeypatch, where):
    """Undo by recapture and replay (the runtime's path): the graph the later passes see
    is the one before the failed pass, so the result is both correct and as optimized."""
    import fusepass.pipeline as pipeline
    names = [n for n, _ in pipeline.STAGES]
    i = names.index("fuse") if where == "before fuse" else names.index("lower") + 1
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:i] + [("corrupting", _corrupting)]
                        + pipeline.STAGES[i:])
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="fusepass")(x)
        gm = optimize(m, [x])
        assert_close(got, want)
        assert_close(gm(x), want)
    errors = gm.fusepass_report.where(action="error")
    assert [e.stage for e in errors] == ["corrupting"] and "halfway" in errors[0].reason
    assert gm.fusepass_report.counts == MLP_COUNTS
    assert not gm.fusepass_report.fell_back


def test_a_finished_graph_reads_its_constants_as_plain_attributes():
    """fusepass.ir.pin_constants: no nn.Module.__getattr__ per constant per call, through
    optimize() and through the backend's variants; outputs unchanged."""
    torch.manual_seed(0)
    m = MLPBlock().eval()
    x = torch.randn(2, 7, 32)
    gm = optimize(m, [x])
    graphs = [gm] + [v.gm for v in gm.__dict__["_fusepass"].variants.values()]
    for g in graphs:
        targets = [n.target for n in g.graph.nodes if n.op == "get_attr"]
        assert targets
        assert all(t in g.__dict__ and t not in g._buffers for t in targets), targets
    with torch.no_grad():
        assert_close(gm(x), m(x))


def test_backend_found_through_entry_point_without_import():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
        x = torch.randn(1, 3, 8, 8)
        assert "fusepass" not in sys.modules
        with torch.no_grad():
            y = torch.compile(m, backend="fusepass")(x)
            torch.testing.assert_close(y, m(x))
        assert "fusepass" in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_deepcopy_of_an_optimized_graph_is_a_clear_error():
    import copy
    torch.manual_seed(0)
    m = MLPBlock().eval()
    gm = optimize(m, [torch.randn(2, 7, 32)])
    with pytest.raises(TypeError, match="deep-copy the source module"):
        copy.deepcopy(gm)


def test_optimize_generates_each_graphs_code_once(monkeypatch):
    """Every pass ends in ``recompile()``; the captured graph is a ``_LazyGraphModule``
    (as Dynamo's backends get theirs), so its code is generated once, when the pipeline
    is done, not after each pass (ResNet-50 through ``optimize``: 17 generations, ~0.5 s
    of the compile, profiled). Counted per graph module, in ``optimize`` and its first call."""
    calls = []
    real = torch.fx.GraphModule.recompile

    def counting(self):
        calls.append(id(self))
        return real(self)

    m = models.build("resnet18")
    x = models.example_input("resnet18", 1, resolution=64)
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", counting)
    gm = optimize(m, [x])
    with torch.no_grad():
        got = gm(x)
    assert calls and max(calls.count(c) for c in calls) == 1, calls
    assert gm.fusepass_report.counts.get("conv2d.relu", 0) >= 8, gm.fusepass_report.summary()
    with torch.no_grad():
        assert_close(got, m(x))
