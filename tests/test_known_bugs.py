"""The anchors' known bugs, each as a test that passes here (issue #8).

Inductor / optimize_for_inference crashed or went wrong on these; fusepass must either
run them optimized and correct, or fall back and say so.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fusepass
from tests.util import assert_close, tiny_bert, histogram, optimize


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(m, *xs):
    with torch.no_grad():
        return torch.compile(m, backend="fusepass")(*xs)


class ConvBNReLU(torch.nn.Module):
    def __init__(self, cin=3, cout=8, **kw):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, **kw)
        self.bn = torch.nn.BatchNorm2d(cout)
        self.lin = torch.nn.Linear(cout, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.lin(y.mean((2, 3)))


def eval_with_stats(m):
    torch.manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_fp64_and_fp16_run_correctly_or_fall_back_reported(dtype):
    """pytorch#98979: an fp64 model through freezing/prepack crashed Inductor."""
    m = eval_with_stats(ConvBNReLU()).to(dtype)
    x = torch.randn(2, 3, 10, 10, dtype=dtype)
    gm = optimize(m, [x])
    rep = gm.fusepass_report
    with torch.no_grad():
        want = m(x)
        got = gm(x)
        assert_close(compiled(m, x), want)
    assert got.dtype == dtype
    assert_close(got, want)
    assert not histogram(gm).get("mkldnn._convolution_pointwise")  # no fp64/fp16 oneDNN kernel
    assert any(str(dtype) in d.reason for d in rep.declined + rep.where(action="kept")), rep


def test_addmm_with_beta_keeps_its_accuracy():
    """pytorch#121253: addmm(beta=0.1) lost accuracy under freezing."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8))
            self.b = torch.nn.Parameter(torch.randn(8) * 100)

        def forward(self, x):
            return torch.addmm(self.b, x, self.w, beta=0.1)

    torch.manual_seed(0)
    m, x = M().eval(), torch.randn(4, 16)
    with torch.no_grad():
        want = m(x)
        torch.testing.assert_close(compiled(m, x), want)
        torch.testing.assert_close(optimize(m, [x])(x), want)


class LinearBN1d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5)
        self.conv, self.bn2 = torch.nn.Conv1d(5, 7, 3), torch.nn.BatchNorm1d(7)

    def forward(self, x):
        y = self.bn(self.lin(x))  # [N, 5]
        z = self.bn2(self.conv(y.unsqueeze(-1).expand(-1, -1, 9)))
        return y, z


def test_batchnorm1d_after_linear_and_conv1d_folds():
    """pytorch#61223 / #86664: BatchNorm1d crashed optimize_for_inference."""
    m = eval_with_stats(LinearBN1d())
    x = torch.randn(3, 6)
    gm = optimize(m, [x])
    with torch.no_grad():
        assert_close(gm(x), m(x))
        assert_close(compiled(m, x), m(x))
    assert sum(v for k, v in gm.fusepass_report.counts.items() if k.startswith("fold.bn")) == 2


@pytest.mark.parametrize("name,model,shape", [
    ("1x1 spatial input", ConvBNReLU(3, 8, padding=1), (2, 3, 1, 1)),
    ("kernel larger than input, padded", ConvBNReLU(3, 8, padding=2), (2, 3, 2, 2)),
    ("groups == channels", ConvBNReLU(8, 8, padding=1, groups=8), (2, 8, 6, 6)),
    ("dilation > 1", ConvBNReLU(3, 8, padding=2, dilation=2), (2, 3, 9, 9)),
    ("batch 0", ConvBNReLU(3, 8), (0, 3, 8, 8)),
])
def test_unusual_conv_shapes(name, model, shape):
    m = eval_with_stats(model)
    x = torch.randn(shape)
    with torch.no_grad():
        want = m(x)
        assert_close(optimize(m, [x])(x), want)
        assert_close(compiled(m, x), want)


def test_stale_weights_after_load_state_dict():
    """pytorch#104984: folded weights went stale after load_state_dict."""
    m = eval_with_stats(ConvBNReLU())
    other = eval_with_stats(ConvBNReLU())
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_()
    x = torch.randn(2, 3, 8, 8)
    c = torch.compile(m, backend="fusepass")
    gm = optimize(m, [x])
    with torch.no_grad():
        c(x), gm(x)
        m.load_state_dict(other.state_dict())
        assert_close(c(x), other(x))
        assert_close(gm(x), other(x))


class InPlaceResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x).relu_()
        z = self.b(y)
        z += x  # residual, in place
        z.relu_()
        y.add_(1.0)  # an intermediate mutated after use
        return z, y


def test_in_place_ops_keep_eager_semantics():
    torch.manual_seed(0)
    m, x = InPlaceResidual().eval(), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = m(x)
        assert_close(compiled(m, x), want)
        assert_close(optimize(m, [x])(x), want)
    rep = fusepass.explain(m, x)
    assert rep.counts.get("conv2d.add", 0) == 1 and rep.counts.get("conv2d.relu", 0) == 2


@pytest.mark.parametrize("check", [False, True])
def test_mutating_a_graph_input_is_kept(check):
    """The input is mutated as eager mutates it; once, also in check mode (which runs
    eager beside the optimized graph)."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x.mul_(2)
            return F.relu(self.conv(x))

    torch.manual_seed(0)
    m = M().eval()
    x0 = torch.randn(1, 3, 4, 4)
    xa, xb = x0.clone(), x0.clone()
    with torch.no_grad():
        want = m(xa)
        got = optimize(m, [x0.clone()], check=check)(xb)
    assert_close(got, want)
    torch.testing.assert_close(xb, xa)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_non_contiguous_and_channels_last_inputs(layout):
    m = eval_with_stats(ConvBNReLU())
    x = torch.randn(2, 3, 12, 12)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x[..., ::2, 1::2]
    with torch.no_grad():
        assert_close(compiled(m, x), m(x))
        assert_close(optimize(m, [x])(x), m(x))


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    pooled: torch.Tensor


class ManyOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, ids):
        h = F.gelu(self.lin(self.emb(ids)))
        return {"h": h, "pair": (h.sum(-1), Out(h * 2, h.mean(1)))}


def test_integer_inputs_and_structured_outputs():
    torch.manual_seed(0)
    m = ManyOutputs().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = m(ids)
        got = compiled(m, ids)
    assert isinstance(got["pair"][1], Out)
    assert_close(got["h"], want["h"])
    assert_close(got["pair"][0], want["pair"][0])
    assert_close(dataclasses.astuple(got["pair"][1]), dataclasses.astuple(want["pair"][1]))


def test_sequence_length_changes_between_calls():
    bert = tiny_bert(1)
    with torch.no_grad():
        c = torch.compile(bert, backend="fusepass")
        for bs, seq in [(1, 8), (2, 13), (1, 8), (3, 5)]:
            ids = torch.randint(0, 100, (bs, seq))
            assert_close(c(ids).last_hidden_state, bert(ids).last_hidden_state)


# --- FUSEPASS_CHECK ---------------------------------------------------------------------

def test_check_mode_names_the_first_diverging_kernel(monkeypatch):
    from fusepass.check import CheckError
    from fusepass.postops import CONV, REGISTRY, Kernel
    # a wrong kernel entry in the registry: relu lowered as oneDNN's sigmoid
    monkeypatch.setitem(REGISTRY["relu"].kernels, "onednn", Kernel("sigmoid", after_binary=CONV))
    m = eval_with_stats(ConvBNReLU())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(CheckError, match=r"first diverging node: _convolution_pointwise.*relu"):
        optimize(m, [x], check=True)(x)
    monkeypatch.setenv("FUSEPASS_CHECK", "1")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="FUSEPASS_CHECK"):
        compiled(m, x)


def test_check_mode_blames_a_rewrite_when_kernels_agree(monkeypatch):
    from fusepass.check import CheckError
    from fusepass.patterns import epilogues
    m = eval_with_stats(ConvBNReLU())
    x = torch.randn(2, 3, 8, 8)
    from fusepass.postops import REGISTRY
    # a wrong row: relu fused as sigmoid (the kernel then faithfully computes sigmoid)
    wrong = epilogues.epilogue_row("conv2d", REGISTRY["sigmoid"], REGISTRY["relu"].spellings[0])
    monkeypatch.setattr(fusepass.patterns.TABLE, "rows", [
        wrong if r.name == "conv2d.relu" else r for r in fusepass.patterns.TABLE.rows])
    with pytest.raises(CheckError, match="a rewrite"):
        optimize(m, [x], check=True)(x)


@pytest.mark.expect_fallback(r"^runtime: RuntimeError: kernel exploded; this variant now runs unoptimized$")
def test_a_kernel_failing_at_run_time_falls_back_to_eager(monkeypatch):
    m = eval_with_stats(ConvBNReLU())
    x = torch.randn(2, 3, 8, 8)
    gm = optimize(m, [x])
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("kernel exploded")

    variant = next(iter(gm._fusepass.variants.values()))
    monkeypatch.setattr(variant.gm, "forward", broken)  # a kernel failing at run time
    with torch.no_grad():
        assert_close(gm(x), m(x))
        assert_close(gm(x), m(x))
    assert calls == [1]  # the variant switched to eager after the first failure
    assert gm.fusepass_report.fell_back
    assert "kernel exploded" in gm.fusepass_report.where(action="fallback")[0].reason


@pytest.mark.expect_fallback(r"^capture: RuntimeError: Given groups=1, .* to have 3 channels, "
                             r"but got 5 channels instead; running unoptimized$")
def test_user_errors_still_raise():
    """The new signature's capture fails with the user's error: that variant runs eager,
    which raises the same error to the user, and the variant's report says so."""
    m = eval_with_stats(ConvBNReLU())
    gm = optimize(m, [torch.randn(2, 3, 8, 8)])
    with torch.no_grad(), pytest.raises(RuntimeError, match="to have 3 channels, but got 5"):
        gm(torch.randn(2, 5, 8, 8))  # wrong channel count: eager raises too
    variants = gm.__dict__["_fusepass"].variants.values()
    fell_back = [d for v in variants for d in v.report.where(action="fallback")]
    assert [d.stage for d in fell_back] == ["capture"] and "but got 5 channels" in fell_back[0].reason
