"""bf16 (issue 18): bf16 models, autocast regions, ``Options.precision``.

Runs on every CPU. What needs oneDNN's native bf16 kernels asks ``require_native_bf16``
and skips with "CPU lacks native bf16" elsewhere; where the feature is missing, a test
checks the decline (and its reason) instead, and the bf16 plan is checked through the
reference lowering (plain ATen bf16, every CPU) and, for the native plan, as a graph
built with the capability pretended (never run: its kernels would raise here).

Tolerances are derived, not copied: bf16 keeps 8 significant bits, so one rounding
errs by at most u = 2^-8 relative. A conv/linear layer rounds its input, its weight and
its output (3 roundings), and its products accumulate in fp32; errors add up over the
layers a value passes. So a bf16 output is within ``3 * layers * u`` of the fp32 result,
relative to the output's magnitude, with a factor 2 of headroom for the accumulation
of random rounding errors across a layer's terms.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusepass
from fusepass.lowering import table
from fusepass.options import OptionError
from tests.util import NATIVE_BF16, histogram, require_native_bf16

U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)
BF16, F32 = torch.bfloat16, torch.float32


def bf16_tol(layers: int) -> float:
    """Max error of a bf16 computation through ``layers`` conv/linear layers, relative to
    the output's magnitude (module docstring)."""
    return 2 * 3 * layers * U


def assert_bf16_close(got, want, layers):
    scale = want.double().abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= bf16_tol(layers) * scale, (
        f"max error {err:.3g} > {bf16_tol(layers):.3g} * {scale:.3g}")


class ConvNet(nn.Module):
    """conv-BN-relu, a residual conv+add+relu, GAP, linear: 3 conv/linear layers deep."""
    LAYERS = 3

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = torch.relu(self.c2(y) + y)
        return self.fc(y.mean((2, 3)))


class MLP(nn.Module):
    """A transformer MLP block: LN, linear-GELU-linear, residual (2 layers deep)."""
    LAYERS = 2

    def __init__(self, d=32, h=64):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class Autocast(nn.Module):
    """``m`` with an autocast-bf16 region inside its forward."""

    def __init__(self, m):
        super().__init__()
        self.m, self.LAYERS = m, m.LAYERS

    def forward(self, x):
        with torch.autocast("cpu", BF16):
            return self.m(x)


def model(name):
    torch.manual_seed(0)
    m = {"convnet": ConvNet, "mlp": MLP}[name]().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, 16) if name == "convnet" else torch.randn(2, 7, 32)
    return m, x


def optimize(m, x, **opts):
    with torch.no_grad():  # the module itself, not a symbolic trace: autocast stays in it
        return fusepass.optimize(m, [x], **opts)


def report_ok(rep):
    bad = [d for d in rep.decisions if d.action in ("error", "fallback")]
    assert not bad, bad


def bf16_ops(gm):
    """The conv/linear nodes (fused or lowered) computing in bf16."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and ("conv" in str(n.target) or "linear" in str(n.target))
            and getattr(n.args[0].meta.get("val"), "dtype", None) == BF16]


def weight_casts_left(gm):
    """Casts of frozen constants still in the graph (they would run on every call)."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.aten._to_copy.default and n.args[0].op == "get_attr"]


# -- the option --------------------------------------------------------------------------

def test_precision_is_validated_and_defaults_to_fp32():
    from fusepass.options import Options
    assert Options().precision == "fp32"
    with pytest.raises(OptionError, match=r"precision='fp16'; valid: \['fp32', 'bf16'\]"):
        Options.from_kwargs(precision="fp16")


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_fp32_never_lowers_precision(name):
    m, x = model(name)
    opt = optimize(m, x)
    assert not bf16_ops(opt)
    assert not opt.fusepass_report.where(stage="capture", rule="precision.bf16")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(NATIVE_BF16, reason="CPU has native bf16: precision='bf16' applies")
@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_precision_bf16_keeps_fp32_on_a_cpu_without_native_bf16(name):
    m, x = model(name)
    opt = optimize(m, x, precision="bf16")
    rep = opt.fusepass_report
    [d] = rep.where(stage="capture", rule="precision.bf16")
    assert d.action == "declined" and "CPU lacks native bf16" in d.reason
    assert not bf16_ops(opt)
    assert rep.kernels, rep.summary()  # still fused and lowered, in fp32
    report_ok(rep)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_precision_bf16_through_the_reference_lowering(name):
    """The bf16 plan on every CPU: plain ATen bf16 kernels, fp32 at the edges."""
    m, x = model(name)
    opt = optimize(m, x, precision="bf16", lowering="reference")
    rep = opt.fusepass_report
    [d] = rep.where(stage="capture", rule="precision.bf16")
    assert d.action == "info" and "bf16" in d.reason
    report_ok(rep)
    assert bf16_ops(opt) and not weight_casts_left(opt)
    with torch.no_grad():
        got, want = opt(x), m(x)
        with torch.autocast("cpu", BF16):
            amp = m(x)
    assert got.dtype == F32 and want.dtype == F32  # fp32 at the graph's edges
    assert_bf16_close(got, want, m.LAYERS)
    assert_bf16_close(got, amp.float(), m.LAYERS)  # the policy is autocast's


def test_precision_bf16_through_the_backend_reference():
    m, x = model("convnet")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, backend="fusepass",
                            options={"precision": "bf16", "lowering": "reference"})(x)
        rep = fusepass.explain(m, x, precision="bf16", lowering="reference")
    assert got.dtype == F32
    assert_bf16_close(got, m(x), m.LAYERS)
    assert rep.where(stage="capture", rule="precision.bf16", action="info")
    report_ok(rep)
    torch._dynamo.reset()


# -- bf16 models -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_bf16_model_runs_without_an_exception_in_the_plan(name):
    m, x = model(name)
    mb = model(name)[0].to(BF16)
    xb = x.to(BF16)
    opt = optimize(mb, xb)
    ref = optimize(model(name)[0].to(BF16), xb, lowering="reference")
    rep = opt.fusepass_report
    report_ok(rep)
    with torch.no_grad():
        got, want, oracle = opt(xb), m(x), ref(xb)
    assert got.dtype == BF16
    assert_bf16_close(got, want, m.LAYERS)
    assert_bf16_close(got, oracle, m.LAYERS)
    if not NATIVE_BF16:  # decided before lowering, said so: no kernel raised
        declined = [d for d in rep.declined if d.stage in ("fuse", "lower")]
        assert declined and all("CPU lacks native bf16" in d.reason for d in declined)
        assert not any(k.startswith("mkldnn") for k in rep.kernels)


def test_bf16_model_through_the_backend():
    m, x = model("convnet")
    mb = model("convnet")[0].to(BF16)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(mb, backend="fusepass")(x.to(BF16))
        rep = fusepass.explain(mb, x.to(BF16))
    assert_bf16_close(got, m(x), m.LAYERS)
    report_ok(rep)
    torch._dynamo.reset()


def test_bn_fold_into_a_bf16_conv_matches_fp64_math():
    """pytorch#145623: folding BN into a bf16 conv in bf16 arithmetic errs ×10. With a
    mean that cancels against beta (terms of ~60, results of ~1), a fold in bf16 loses
    the result; fusepass folds in float64 and rounds once."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    bn.running_mean.uniform_(40, 80)
    bn.running_var.uniform_(1e-3, 1e-2)
    bn.weight.data.uniform_(0.5, 1.5)
    s = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
    bn.bias.data = (bn.running_mean.double() * s).float() + torch.randn(8)  # beta ≈ mean*s
    m = nn.Sequential(conv, bn).eval().to(BF16)
    x = torch.randn(2, 8, 8, 8).to(BF16)
    opt = optimize(m, x)
    assert opt.fusepass_report.rewrites.get("fold.bn.conv") == 1
    report_ok(opt.fusepass_report)
    # fp64 math on the very bf16 parameters
    p = {k: v.double() for k, v in m.state_dict().items() if v.is_floating_point()}
    y = torch.nn.functional.conv2d(x.double(), p["0.weight"], p["0.bias"], padding=1)
    sc = p["1.weight"] / (p["1.running_var"] + bn.eps).sqrt()
    want = (y - p["1.running_mean"][:, None, None]) * sc[:, None, None] + p["1.bias"][:, None, None]
    # the bound: folded W', b' rounded once (u each) and bf16 conv accumulation, per term
    w64 = p["0.weight"] * sc[:, None, None, None]
    b64 = (p["0.bias"] - p["1.running_mean"]) * sc + p["1.bias"]
    bound = 4 * U * (torch.nn.functional.conv2d(x.double().abs(), w64.abs(), padding=1)
                     + b64.abs()[:, None, None])
    with torch.no_grad():
        got = opt(x).double()
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max()
    # the test is sharp enough to catch the bug: the same fold in bf16 arithmetic fails it
    pb = {k: v for k, v in m.state_dict().items()}
    sb = pb["1.weight"] / (pb["1.running_var"] + bn.eps).sqrt()
    bad_b = (pb["0.bias"] - pb["1.running_mean"]) * sb + pb["1.bias"]
    bad = torch.nn.functional.conv2d(x, pb["0.weight"] * sb[:, None, None, None], bad_b, padding=1)
    assert not (bad.double() - want).abs().le(bound).all()


# -- autocast regions --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_autocast_inside_optimize(name):
    m, x = model(name)
    a = Autocast(m)
    opt = optimize(a, x)
    rep = opt.fusepass_report
    report_ok(rep)
    assert not weight_casts_left(opt)  # weights cast once, at compile time
    assert rep.rewrites.get("fold_weight_casts"), rep.summary()
    assert not [d for d in rep.decisions if "mixed dtypes" in d.reason]
    with torch.no_grad():
        got, want, fp32 = opt(x), a(x), m(x)
    assert got.dtype == want.dtype  # the MLP's residual add promotes back to fp32
    assert_bf16_close(got, fp32, m.LAYERS)
    assert_bf16_close(got, want, m.LAYERS)
    report_ok(rep)  # the first call did not fall back either


def test_autocast_bn_fold_rounds_once_from_the_fp32_weight():
    """conv under autocast then BN: the folded bf16 weight is round(W_fp32 * s), not
    round(round(W) * s). Prepacking is off: with native bf16 it would turn that weight into
    an opaque oneDNN tensor (the value checked here is the fold's, before packing)."""
    m, x = model("convnet")
    opt = optimize(Autocast(m), x, disable=["prepack_weights"])
    assert opt.fusepass_report.rewrites.get("fold.bn.conv") == 1
    bn = m.bn
    s = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    want = (m.c1.weight.double() * s[:, None, None, None]).to(BF16)
    weights = [getattr(opt, n.target) for n in opt.graph.nodes if n.op == "get_attr"]
    assert any(w.shape == want.shape and w.dtype == BF16 and torch.equal(w, want)
               for w in weights if not w.is_mkldnn)


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_autocast_inside_the_compiled_function(name):
    m, x = model(name)
    a = Autocast(m)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(a, backend="fusepass")(x)
        want = a(x)
        rep = fusepass.explain(a, x)
    assert got.dtype == want.dtype
    assert_bf16_close(got, want, m.LAYERS)
    report_ok(rep)
    torch._dynamo.reset()


def test_autocast_outside_the_compiled_function():
    m, x = model("convnet")
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", BF16):
        got = torch.compile(m, backend="fusepass")(x)
        want = m(x)
        rep = fusepass.explain(m, x)
    assert got.dtype == want.dtype == BF16
    assert_bf16_close(got, want, m.LAYERS)
    report_ok(rep)
    assert not any("mixed dtypes" in d.reason for d in rep.decisions)
    torch._dynamo.reset()


def test_optimize_then_call_under_autocast_builds_an_autocast_variant():
    """A graph traced without autocast would ignore it: the ambient autocast state keys
    the variant, as it does Dynamo's guards."""
    m, x = model("convnet")
    opt = optimize(m, x)
    with torch.no_grad():
        assert opt(x).dtype == F32
        with torch.autocast("cpu", BF16):
            got, want = opt(x), m(x)
    assert got.dtype == want.dtype == BF16
    assert_bf16_close(got, want, m.LAYERS)


# -- the native-bf16 plan ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["bf16_model", "precision", "autocast"])
def test_the_native_plan_lowers_to_onednn_bf16_kernels_with_bf16_weights(monkeypatch, case):
    """With the capability pretended, the plan a native-bf16 CPU gets: bf16 convs and
    linears lowered to oneDNN's kernels, bf16 constant weights, fp32 edges. Built and
    checked by the fake-tensor verifier, never run (the kernels would raise here);
    prepacking (which calls oneDNN at compile time) is left out."""
    monkeypatch.setattr(table, "native_bf16", lambda: True)
    m, x = model("convnet")
    if case == "bf16_model":
        m, x = m.to(BF16), x.to(BF16)
    opts = {"precision": "bf16"} if case == "precision" else {}
    opt = optimize(Autocast(m) if case == "autocast" else m, x,
                   disable="prepack_weights", **opts)
    rep = opt.fusepass_report
    report_ok(rep)
    h = histogram(opt)
    assert h["mkldnn._convolution_pointwise"] + h["mkldnn._convolution_pointwise.binary"] == 2, h
    assert h["mkldnn._linear_pointwise"] == 1, h
    assert not weight_casts_left(opt)
    for n in opt.graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("mkldnn"):
            w = n.args[2] if "binary" in str(n.target) else n.args[1]
            assert w.op == "get_attr" and getattr(opt, w.target).dtype == BF16, n.format_node()
    out = next(n for n in opt.graph.nodes if n.op == "output").args[0]
    assert out.meta["val"].dtype == (F32 if case == "precision" else BF16)
    # and prepack_weights would pack every one of them (bf16 blocked weights): its
    # decision, asked without calling oneDNN
    from fusepass.passes import prepack_weights as P
    kernels = [n for n in opt.graph.nodes if n.target in P.KERNELS]
    assert len(kernels) == 3
    for n in kernels:
        kind, xi, wi, _ = P.KERNELS[n.target]
        assert P._why_not(opt, n, kind, n.args[xi], n.args[wi]) is None, n.format_node()
    assert not [d for d in rep.decisions if "mixed dtypes" in d.reason or "lacks" in d.reason]


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_native_bf16_kernels_numerics(name):
    require_native_bf16()
    m, x = model(name)
    for opt, xin, layers in [(optimize(model(name)[0].to(BF16), x.to(BF16)), x.to(BF16), m.LAYERS),
                             (optimize(m, x, precision="bf16"), x, m.LAYERS),
                             (optimize(Autocast(m), x), x, m.LAYERS)]:
        rep = opt.fusepass_report
        report_ok(rep)
        assert any(k.startswith("mkldnn") for k in rep.kernels), rep.summary()
        assert bf16_ops(opt)
        with torch.no_grad():
            assert_bf16_close(opt(xin).float(), m(x), layers)


class Conv1D(nn.Module):
    """GPT-2's Conv1D spelling, ``addmm(b, x, W)``, then GELU."""
    LAYERS = 1

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(16, 32) / 4), nn.Parameter(torch.randn(32))

    def forward(self, x):
        return torch.nn.functional.gelu(torch.addmm(self.b, x, self.w))


def test_autocast_addmm_spelling_is_a_bf16_linear(monkeypatch):
    """Under autocast ``addmm``'s weight reaches it through a cast: capture still sees a
    frozen weight and makes the one linear spelling (bf16 weight), which fuses GELU."""
    torch.manual_seed(0)
    m, x = Conv1D().eval(), torch.randn(3, 16)
    opt = optimize(Autocast(m), x)
    report_ok(opt.fusepass_report)
    assert not weight_casts_left(opt)
    with torch.no_grad():
        got, want = opt(x), Autocast(m)(x)
    assert got.dtype == want.dtype == BF16
    assert_bf16_close(got, want, m.LAYERS)
    monkeypatch.setattr(table, "native_bf16", lambda: True)
    opt = optimize(Autocast(m), x, disable="prepack_weights")
    assert histogram(opt)["mkldnn._linear_pointwise"] == 1
    assert opt.fusepass_report.counts.get("linear.gelu") == 1


def test_check_mode_judges_precision_bf16_by_bf16_tolerance():
    """check=True compares with fp32 eager; a bf16-precision graph is judged by bf16's
    tolerance (its edges are fp32, its arithmetic is not)."""
    m, x = model("convnet")
    opt = optimize(m, x, precision="bf16", lowering="reference", check=True)
    with torch.no_grad():
        assert_bf16_close(opt(x), m(x), m.LAYERS)
    report_ok(opt.fusepass_report)
