"""Outputs keep eager's strides (README's promise), values match, and nothing errors or
falls back: the four layout bugs found with random graphs as tests, and a property test
over random small conv graphs (conv1d/2d/3d, C == 1, size-1 spatial dims, channels-last
models fed contiguous inputs and the reverse, residuals with either operand first)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.util import assert_close, examples, optimize

CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def check(m, x):
    m = m.eval()
    gm = optimize(m, [x])
    rep = gm.fusepass_report
    assert not rep.where(action="error") and not rep.fell_back, rep
    with torch.no_grad():
        want, got = m(x), gm(x)
    assert_close(got, want)
    assert got.stride() == want.stride(), (got.stride(), want.stride())
    return rep


class ShortcutFirst(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return x + self.op(x)


def test_other_plus_conv_keeps_eagers_layout():
    """eager lays ``x + conv(x)`` out after x; the fused op would give the conv's layout."""
    m = ShortcutFirst(nn.Conv2d(3, 3, 3, padding=1)).to(memory_format=torch.channels_last)
    rep = check(m, torch.randn(1, 3, 7, 8))
    assert any("lays the result out" in d.reason for d in rep.declined), rep


def test_other_times_linear_keeps_eagers_layout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("p", torch.randn(8, 8))

        def forward(self, x):
            return torch.mm(self.p, x.t()).t() + self.lin(x)

    check(M(), torch.randn(4, 8))


def test_conv3d_fed_channels_last_stays_contiguous_like_eager():
    check(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU()),
          torch.randn(1, 4, 6, 6, 6).to(memory_format=torch.channels_last_3d))


def _fake_conv1d_strides_are_real() -> bool:
    """torch 2.8 (the IPEX env) reports (24, 12, 1) for this conv under FakeTensorMode
    where its kernel returns (24, 1, 2); capture traces with fake tensors, so no pass can
    know eager's strides there. torch 2.13's agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w = torch.randn(3, 12).reshape(-1, 12, 1).permute(0, 2, 1), torch.randn(2, 1, 1)
    with FakeTensorMode() as mode:
        fake = torch.conv1d(mode.from_tensor(x), mode.from_tensor(w)).stride()
    return fake == torch.conv1d(x, w).stride()


@pytest.mark.skipif(not _fake_conv1d_strides_are_real(),
                    reason="this torch's fake conv1d strides differ from its kernel's")
def test_conv1d_on_a_permuted_input():
    check(nn.Conv1d(1, 2, 1, bias=False), torch.randn(3, 12).reshape(-1, 12, 1).permute(0, 2, 1))


def test_prepack_does_not_pack_a_conv_channels_last_only_by_ambiguity():
    check(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 3, 3, padding=1)),
          torch.randn(2, 1, 6, 6))


def test_batch_norm_of_an_ambiguous_input_is_contiguous_as_on_the_cpu():
    check(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 24, 2, stride=2, dilation=2)),
          torch.randn(1, 1, 4, 11).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("dim", [2, 3])
def test_adaptive_pool_to_one_keeps_the_strides_a_conv_reads(dim):
    pool = F.adaptive_avg_pool2d if dim == 2 else F.adaptive_avg_pool3d
    conv = nn.Conv2d if dim == 2 else nn.Conv3d

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv(6, 6, 2, padding=1)

        def forward(self, x):
            return self.conv(pool(x, 1))

    shape = (2, 6, 5, 6) if dim == 2 else (2, 6, 5, 6, 5)
    check(M(), torch.randn(shape).to(memory_format=CL[dim + 2]))


def test_squeeze_excite_convs_stay_packed():
    """[N,C,1,1] squeeze-excite convs are channels-last only by ambiguity; nobody can tell
    (the gate broadcasts), so their weights are still packed."""
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)

        def forward(self, x):
            y = self.conv(x)
            s = torch.sigmoid(self.expand(F.silu(self.reduce(y.mean((2, 3), keepdim=True)))))
            return y * s

    rep = check(SE().to(memory_format=torch.channels_last),
                torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last))
    assert rep.rewrites.get("prepack.conv") == 3, rep


@st.composite
def graphs(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    c = draw(st.sampled_from([1, 3]))
    size = [draw(st.sampled_from([1, 2, 5])) for _ in range(dim)]
    return dict(dim=dim, c=c, cout=draw(st.sampled_from([1, 2, 4])), size=size,
                batch=draw(st.integers(0, 3)), k=draw(st.sampled_from([1, 3])),
                bn_before=draw(st.booleans()), bn_after=draw(st.booleans()),
                relu=draw(st.booleans()), residual=draw(st.sampled_from([None, "first", "second"])),
                # C == 1 or cout == 1 laid out channels-last is contiguous too: the CPU's
                # pointwise kernels and BatchNorm then return other strides than the fake
                # ones (fusepass.ir.cpu_pointwise_strides)
                model_cl=draw(st.booleans()), input_cl=draw(st.booleans()),
                pool=draw(st.booleans()))


class Random(nn.Module):
    def __init__(self, g):
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[g["dim"]]
        BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[g["dim"]]
        c, cout = g["c"], g["cout"] if not g["residual"] else g["c"]
        if g["residual"] and c == 1 and g["bn_after"]:
            cout = c
        self.g = g
        self.bn0 = BN(c) if g["bn_before"] else nn.Identity()
        self.conv = Conv(c, cout, g["k"], padding=g["k"] // 2)
        self.bn1 = BN(cout) if g["bn_after"] else nn.Identity()
        for bn in (self.bn0, self.bn1):
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
        self.conv2 = Conv(cout, 2, 1)

    def forward(self, x):
        y = self.bn1(self.conv(self.bn0(x)))
        if self.g["residual"] == "first":
            y = x + y
        elif self.g["residual"] == "second":
            y = y + x
        if self.g["relu"]:
            y = F.relu(y)
        if self.g["pool"] and self.g["dim"] > 1:
            pool = F.adaptive_avg_pool2d if self.g["dim"] == 2 else F.adaptive_avg_pool3d
            y = pool(y, 1)
        return self.conv2(y)


@settings(max_examples=examples(40))
@given(graphs(), st.integers(0, 2**16))
def test_random_conv_graphs_keep_eagers_values_and_strides(g, seed):
    torch.manual_seed(seed)
    m = Random(g)
    x = torch.randn(g["batch"], g["c"], *g["size"])
    fmt = CL.get(x.dim())
    if fmt is not None and g["model_cl"]:
        m = m.to(memory_format=fmt)
    if fmt is not None and g["input_cl"]:
        x = x.to(memory_format=fmt)
    check(m, x)


def test_batchnorm_after_a_single_channel_conv_is_not_folded_across_a_layout_change():
    # conv(3 -> 1) on a channels-last input returns strides that are contiguous and
    # channels-last at once; the CPU BatchNorm returns contiguous ones, and the next conv
    # picks its layout from them. Folding would hand that conv the ambiguous strides (it
    # failed the verifier, and the whole graph ran unoptimized).
    m = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3))
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    rep = check(m, x)
    assert "fold.bn.conv2d" not in rep.counts
    assert any("ambiguous with a size-1 dim" in d.reason for d in rep.where(action="declined")), rep


# ------------------------------------------------------------------ ambiguous strides
# A value with a size-1 dim laid out channels-last is contiguous too. The CPU kernels of
# pointwise ops and BatchNorm then allocate their result contiguous (TensorIterator's fast
# setup) where the fake kernels keep channels-last strides; a later conv reads even a
# size-1 dim's stride to choose its layout.

def test_relu_after_a_one_channel_conv_keeps_eagers_strides():
    """eager (36, 36, 6, 1): the fused conv+relu kernel writes (36, 1, 6, 1); a free view
    restrides it."""
    rep = check(nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.ReLU()),
                torch.randn(1, 3, 6, 6).to(memory_format=torch.channels_last))
    assert rep.rewrites.get("conv2d.relu") == 1, rep


def test_a_residual_of_one_channel_values_is_contiguous_as_on_the_cpu():
    """x + bn(conv(x)) with C == 1: the CPU's add returns contiguous strides, so the next
    conv runs contiguous (eager (20, 10, 5, 1)); the fake add kept channels-last and the
    conv came back channels-last (20, 1, 10, 2)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.conv2 = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv2(x + self.bn(self.conv(x)))

    check(M(), torch.randn(1, 1, 2, 5).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("dim", [2, 3])
def test_pool_to_one_after_a_batch_norm_of_one_channel_keeps_eagers_strides(dim):
    """adaptive_avg_pool(x, 1) restrides to channels-last when its input suggests it; the
    trace decided that on the fake input (channels-last), the CPU on the real one
    (contiguous, after a one-channel BatchNorm): eager (2, 1, 1, 1)."""
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
    pool = F.adaptive_avg_pool2d if dim == 2 else F.adaptive_avg_pool3d

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv, self.conv2 = bn(1), conv(1, 4, 3, padding=1), conv(4, 2, 1)

        def forward(self, x):
            return self.conv2(pool(self.conv(self.bn(x)), 1))

    shape = (1, 1, 2, 5) if dim == 2 else (2, 1, 2, 2, 1)
    check(M(), torch.randn(shape).to(memory_format=CL[dim + 2]))


def _ambiguous(shape):
    """The strides oneDNN's channels-last conv writes for ``shape`` (size-1 dims included)."""
    return torch.empty(shape, memory_format=CL[len(shape)]).normal_()


_POINTWISE = {
    "relu": lambda x: torch.relu(x), "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu,
    "hardswish": F.hardswish, "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "hardtanh": lambda x: F.hardtanh(x, 0.0, 6.0), "clamp": lambda x: torch.clamp(x, 0.0, 6.0),
    "add_number": lambda x: x + 2.0, "mul_number": lambda x: x * 2.0,
    "add_self": lambda x: x + x,
}
# ops with a tensor operand c, made from x's shape
_WITH = {"add_contiguous": (lambda x, c: x + c, lambda x: torch.ones(x.shape)),
         "mul_channel": (lambda x, c: x * c, lambda x: torch.ones(x.shape[1], *([1] * (x.dim() - 2))))}
_POINTWISE.update({k: f for k, (f, _) in _WITH.items()})


@pytest.mark.parametrize("shape", [(2, 1, 6, 6), (2, 3, 1, 1), (2, 1, 1, 5), (2, 1, 3, 1, 2),
                                   (3, 1, 1, 1, 2), (2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("op", sorted(_POINTWISE))
def test_meta_of_pointwise_ops_has_the_cpu_kernels_strides(op, shape):
    """Capture's meta (fake, corrected by ``ir.cpu_pointwise_strides``) against the real
    CPU kernel's strides, size-1 dims included, on values contiguous and channels-last
    at once (and one that is not, (2, 3, 4, 5))."""
    from fusepass.capture import capture, lift_module

    x = _ambiguous(shape)
    c = _WITH[op][1](x) if op in _WITH else None

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", c)

        def forward(self, x):
            return _POINTWISE[op](x, self.c) if op in _WITH else _POINTWISE[op](x)

    lifted, weights = lift_module(torch.fx.symbolic_trace(M()))
    with torch.no_grad():
        gm = capture(lifted, weights() + [x], freeze=True).gm
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    meta = (out[0] if isinstance(out, (tuple, list)) else out).meta["val"]
    with torch.no_grad():
        assert meta.stride() == M()(x).stride()


def test_stride_bench_on_the_tiny_net():
    """bench/strides.py runs, and its tiny net (conv-BN-ReLU, residual, SE) keeps eager's
    output strides, with oneDNN kernels."""
    from bench.strides import measure
    row = measure("tiny", 1, 1)
    assert row["strides_equal_eager"], row
    assert row["ops"].get("mkldnn._convolution_pointwise.default", 0) >= 1, row
