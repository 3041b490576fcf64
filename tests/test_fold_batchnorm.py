"""fold_batchnorm: every ``fold.bn*`` row matches once on its own example, the op
histogram before/after is what the row says, numerics match eager (every row with every op
it folds into -- conv 1d/2d/3d, transposed 1d/2d/3d, linear -- and hypothesis drawing
grouped, depthwise, strided shapes, fp32/bf16, contiguous/channels_last),
bf16 folding does not amplify error, and the negative cases leave BN in place with a
reason."""
from __future__ import annotations

import pytest
import torch
from torch._prims_common import suggest_memory_format
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusepass
from fusepass._compat import TRACES_BN_AS_LEGIT
from fusepass.patterns import TABLE
from tests.util import assert_close, examples, histogram, optimize

aten = torch.ops.aten
BN_ROWS = TABLE.select("fold.bn")
NO_FOLDS = ["fold_batchnorm", "fold_binary_constants", "fuse"]


def reinit(m, seed=0):
    """Non-trivial BN statistics and affine params (a fresh BN folds to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.running_mean is not None:
                    mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.5)
                    mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.8 + 0.2)
                if mod.affine:
                    sign = torch.randint(0, 2, mod.weight.shape, generator=g) * 2 - 1
                    mod.weight.copy_(sign * (torch.rand(mod.weight.shape, generator=g) + 0.5))
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.5)
    return m


class ConvBN(nn.Module):
    """conv/linear -> BatchNorm, in one of the spellings capture may see."""

    def __init__(self, op, bn, spelling="module"):
        super().__init__()
        self.op, self.bn, self.spelling = op, bn, spelling

    def forward(self, x):
        y = self.op(x)
        bn = self.bn
        if self.spelling == "functional":
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                False, 0.1, bn.eps)
        if self.spelling == "legit_no_training":
            return aten._native_batch_norm_legit_no_training.default(
                y, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps)[0]
        return bn(y)


def conv_bn(rank=2, cin=4, cout=6, spelling="module", **kw):
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][rank - 1](cin, cout, 3, padding=1, **kw)
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][rank - 1](cout)
    return reinit(ConvBN(conv, bn, spelling)).eval()


def linear_bn(cin=5, cout=6, spelling="module", bias=True):
    return reinit(ConvBN(nn.Linear(cin, cout, bias=bias), nn.BatchNorm1d(cout), spelling)).eval()


ROW_EXAMPLES = {
    "fold.bn.conv": (lambda: conv_bn(), (2, 4, 7, 7), "aten.native_batch_norm"),
    "fold.bn.linear": (lambda: linear_bn(), (3, 5), "aten.native_batch_norm"),
    "fold.bn_no_training.conv": (lambda: conv_bn(spelling="legit_no_training"), (2, 4, 7, 7),
                                 "aten._native_batch_norm_legit_no_training"),
    "fold.bn_no_training.linear": (lambda: linear_bn(spelling="legit_no_training"), (3, 5),
                                   "aten._native_batch_norm_legit_no_training"),
}


def test_every_bn_row_has_an_example():
    assert sorted(r.name for r in BN_ROWS) == sorted(ROW_EXAMPLES)


@pytest.mark.parametrize("row", sorted(ROW_EXAMPLES))
def test_row_matches_once_histogram_and_numerics(row):
    if row.startswith("fold.bn_no_training") and TRACES_BN_AS_LEGIT:
        pytest.skip("torch 2.8 traces every eval BatchNorm as _native_batch_norm_legit_no_training "
                    "and capture rewrites it to native_batch_norm: this spelling folds by fold.bn.*")
    make, shape, bn_op = ROW_EXAMPLES[row]
    m, x = make(), torch.randn(shape)
    before = histogram(optimize(m, [x], disable=NO_FOLDS, lowering="reference"))
    gm = optimize(m, [x], disable=["fuse"], lowering="reference")
    after = histogram(gm)
    assert gm.fusepass_report.counts == {row: 1}
    assert before[bn_op] == 1 and after[bn_op] == 0, (before, after)
    assert before["getitem"] == 1 and after["getitem"] == 0
    kernel = "aten.linear" if row.endswith("linear") else "aten.convolution"
    assert before[kernel] == after[kernel] == 1
    assert sum(after.values()) == 1, after  # nothing but the conv/linear is left
    with torch.no_grad():
        assert_close(gm(x), m(x))
        assert_close(optimize(m, [x])(x), m(x))  # and through the whole pipeline


@pytest.mark.parametrize("spelling", ["module", "functional"])
def test_functional_batch_norm_eval_folds_like_the_module(spelling):
    m, x = conv_bn(spelling=spelling), torch.randn(2, 4, 6, 6)
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts.get("fold.bn.conv") == 1
    with torch.no_grad():
        assert_close(gm(x), m(x))


# The property test's case table: each fold.bn* row with every op it folds into. The row's
# form is the BatchNorm spelling (ConvBN), its family the op kind.
BN_SPELLINGS = {"bn": "module", "bn_no_training": "legit_no_training"}
BN_OPS = {"conv": ["conv1d", "conv2d", "conv3d",
                   "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"],
          "linear": ["linear"]}
BN_CASES = [(r.name, op) for r in BN_ROWS if r.name.split(".")[1] in BN_SPELLINGS
            for op in BN_OPS.get(r.name.split(".")[2], [])]


def test_every_bn_row_has_property_cases():
    assert sorted({row for row, _ in BN_CASES}) == sorted(r.name for r in BN_ROWS)


@st.composite
def bn_case(draw, op):
    """Shapes, dtype and layout for ``op`` ("conv2d", "conv_transpose1d", "linear", ...)."""
    kind = "linear" if op == "linear" else op[:-2]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias, affine = draw(st.booleans()), draw(st.booleans())
    batch = draw(st.integers(1, 3))
    if kind == "linear":
        cin, cout = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        return kind, 2, dict(cin=cin, cout=cout, bias=bias, affine=affine), (batch, cin), dtype, False
    rank = int(op[-2])
    groups = draw(st.sampled_from([1, 2, 4]))
    depthwise = draw(st.booleans())
    cin = groups * draw(st.integers(1, 2))
    cout = cin if depthwise else groups * draw(st.integers(1, 3))
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2))
    size = draw(st.integers(dilation * (k - 1) + 1, 7 if rank < 3 else 5))
    kw = dict(cin=cin, cout=cout, k=k, stride=stride, padding=padding, dilation=dilation,
              groups=groups, bias=bias, affine=affine)
    if kind == "conv_transpose":
        kw["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    channels_last = rank > 1 and draw(st.booleans())
    return kind, rank, kw, (batch, cin) + (size,) * rank, dtype, channels_last


def build(kind, rank, kw, spelling="module"):
    kw = dict(kw)
    cin, cout, affine = kw.pop("cin"), kw.pop("cout"), kw.pop("affine")
    if kind == "linear":
        op, bn = nn.Linear(cin, cout, bias=kw["bias"]), nn.BatchNorm1d(cout, affine=affine)
    else:
        k = kw.pop("k")
        cls = {"conv": [nn.Conv1d, nn.Conv2d, nn.Conv3d],
               "conv_transpose": [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]}[kind]
        op = cls[rank - 1](cin, cout, k, **kw)
        bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][rank - 1](cout, affine=affine)
    return reinit(ConvBN(op, bn, spelling)).eval()


@pytest.mark.parametrize("row,op", BN_CASES, ids=[f"{row}-{op}" for row, op in BN_CASES])
@settings(max_examples=examples(4))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_bn_fold_numerics_vs_eager(row, op, data, seed):
    kind, rank, kw, shape, dtype, channels_last = data.draw(bn_case(op), label="case")
    form = row.split(".")[1]
    torch.manual_seed(seed)
    m = build(kind, rank, kw, BN_SPELLINGS[form]).to(dtype)
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if rank == 2 else torch.channels_last_3d)
    gm = optimize(m, [x])
    # torch 2.8 traces every eval BatchNorm as _native_batch_norm_legit_no_training, which
    # capture rewrites to native_batch_norm: the bn_no_training spelling folds by fold.bn.*
    folds_by = row.replace("fold.bn_no_training.", "fold.bn.") if TRACES_BN_AS_LEGIT else row
    with torch.no_grad():  # eager's own layouts: does BatchNorm lay its result out otherwise?
        conv_out, bn_out = m.op(x), m(x)
    if conv_out.dim() in (4, 5) and suggest_memory_format(conv_out) != suggest_memory_format(bn_out):
        rep = gm.fusepass_report
        assert folds_by not in rep.counts, rep
        assert any("ambiguous with a size-1 dim" in d.reason for d in rep.where(action="declined")), rep
    else:
        assert gm.fusepass_report.counts.get(folds_by) == 1, gm.fusepass_report
        h = histogram(gm)
        assert h["aten.native_batch_norm"] == h["aten._native_batch_norm_legit_no_training"] == 0, h
    with torch.no_grad():
        want, got = m(x), gm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got, want, dtype)


def test_bf16_folding_does_not_amplify_error():
    """pytorch#145623: BN folded in bf16 arithmetic took the error from 0.016 to 0.12.
    Folded in float64 and rounded once, the bf16 graph is as close to the float64 truth
    as eager bf16 is."""
    torch.manual_seed(0)
    m = conv_bn(cin=16, cout=32)
    with torch.no_grad():
        m.bn.running_var.uniform_(1e-3, 1e-2)  # large scales s = gamma/sqrt(var+eps)
        m.bn.running_mean.normal_(0, 3)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        truth = m.double()(x.double())
        eager = m.bfloat16()(x.bfloat16()).double()
        folded = optimize(m, [x.bfloat16()])(x.bfloat16()).double()
    err_eager = (eager - truth).abs().max().item()
    err_folded = (folded - truth).abs().max().item()
    assert err_folded <= 1.3 * err_eager, (err_folded, err_eager)  # bf16 math: ~1.7x


def test_chain_of_two_batchnorms_folds_to_one_conv():
    m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.BatchNorm2d(5, affine=False))
    m = reinit(m).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = optimize(m, [x], disable=["fuse"], lowering="reference")
    assert gm.fusepass_report.counts == {"fold.bn.conv": 2}
    assert sum(histogram(gm).values()) == 1
    with torch.no_grad():
        assert_close(gm(x), m(x))


class Interleaved(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x) * 2) + 1)


def test_batchnorm_behind_a_constant_folds_in_the_same_fixpoint():
    """conv -> *2 -> BN -> +1 -> BN: the BNs become adjacent only as the constants fold."""
    m, x = reinit(Interleaved()).eval(), torch.randn(1, 3, 6, 6)
    gm = optimize(m, [x], disable=["fuse"], lowering="reference")
    assert histogram(gm) == {"aten.convolution": 1}
    assert gm.fusepass_report.counts == {"fold.bn.conv": 2, "fold.const.conv.mul": 1,
                                         "fold.const.conv.add": 1}
    with torch.no_grad():
        assert_close(gm(x), m(x))
    # disabling the pass disables BN folding everywhere
    gm = optimize(m, [x], disable=["fuse", "fold_batchnorm"], lowering="reference")
    assert histogram(gm)["aten.native_batch_norm"] == 2


def test_backend_folds_batchnorm():
    torch._dynamo.reset()
    m, x = conv_bn(), torch.randn(2, 4, 6, 6)
    report = fusepass.explain(m, x)
    assert report.counts.get("fold.bn.conv") == 1, report
    with torch.no_grad():
        assert_close(torch.compile(m, backend="fusepass")(x), m(x))


def test_shared_weight_folds_into_a_new_constant_and_leaves_the_other_user_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x * 2)

    m = reinit(Shared()).eval()
    x = torch.randn(1, 3, 6, 6)
    w = m.conv.weight.detach().clone()
    gm = optimize(m, [x])
    assert gm.fusepass_report.counts.get("fold.bn.conv") == 1
    with torch.no_grad():
        assert_close(gm(x), m(x))
    assert torch.equal(m.conv.weight, w)


# --- negative cases: BN stays, the report says why --------------------------------------

class TwoUsers(nn.Module):
    def __init__(self, as_output=False):
        super().__init__()
        self.conv, self.bn, self.as_output = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), as_output

    def forward(self, x):
        y = self.conv(x)
        return (self.bn(y), y) if self.as_output else self.bn(y) + torch.relu(y)


class LinearBN3d(nn.Module):
    """BatchNorm1d over a [N, L, C] linear output normalizes L, not the features."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 6), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


def negative_var():
    m = conv_bn()
    with torch.no_grad():
        m.bn.running_var[0] = -1.0
    return m


@pytest.mark.parametrize("make,shape,train,reason", [
    (lambda: reinit(TwoUsers()), (1, 3, 6, 6), False, "has 2 users"),
    (lambda: reinit(TwoUsers(as_output=True)), (1, 3, 6, 6), False, "is a graph output"),
    (lambda: reinit(LinearBN3d()), (2, 3, 5), False, "not its output features"),
    (lambda: conv_bn(), (2, 4, 6, 6), True, "training mode"),
    (lambda: ConvBN(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)),
     (2, 4, 6, 6), False, "batch statistics"),
    (negative_var, (2, 4, 6, 6), False, "running_var + eps is not positive"),
], ids=["two-users", "graph-output", "linear-3d", "train-mode", "no-running-stats", "negative-var"])
def test_unfoldable_batchnorm_is_declined_with_a_reason(make, shape, train, reason):
    m = make().train(train)
    x = torch.randn(shape)
    base = histogram(optimize(m, [x], disable=NO_FOLDS))
    gm = optimize(m, [x], disable=["fuse"])
    report = gm.fusepass_report
    assert not [k for k in report.counts if k.startswith("fold.")], report
    declined = report.where(stage="fold_batchnorm", action="declined")
    assert declined and all(reason in d.reason for d in declined), report
    assert histogram(gm) == base
    if not train:  # a training-mode forward updates the running stats: compare once
        with torch.no_grad():
            got, want = gm(x), m(x)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-4)
