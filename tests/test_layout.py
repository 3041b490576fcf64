"""propagate_layout: golden before/expected graphs, boundary counts, meta strides, and
numerics + output strides against eager for contiguous and channels-last inputs.

The goldens run the pass alone on the captured graph (no folding or fusion), so they
pin what the pass does and nothing else. A sketch shows each op with its activation
inputs (weights omitted); ``to_nhwc``/``to_nchw`` are the pass's conversions,
``aten.clone(x, memory_format=channels_last|contiguous_format)``.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

from bench import zoo as models
from fusepass.capture import capture, lift_module
from fusepass.ir import as_cpu_kernel_writes
from fusepass.options import Options
from fusepass.pipeline import verify
from fusepass.report import Report
from fusepass.passes.propagate_layout import propagate_layout
from tests.util import assert_close, examples, optimize

CL = torch.channels_last


# ------------------------------------------------------------------ the models
class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


class ConvPoolFlattenLinear(nn.Module):
    def __init__(self, gap=False):
        super().__init__()
        self.gap = gap
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 if gap else 8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.c(x))
        y = F.adaptive_avg_pool2d(y, 1) if self.gap else F.max_pool2d(y, 2)
        return self.fc(torch.flatten(y, 1))


class BranchesAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return torch.relu(self.c1(x)) + self.c2(x)


class BranchesCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c3(torch.cat([self.c1(x), torch.sigmoid(self.c2(x))], 1))


class NoConv(nn.Module):
    def forward(self, x):
        y = torch.relu(x) * 2
        return F.max_pool2d(y, 2).flatten(1), x.permute(0, 2, 3, 1).sum(-1)


class OutputInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return y, self.c2(y)


class LoneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.c(x)


class SumIntoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, y):
        return self.c2(torch.relu(self.c1(x + y))).permute(0, 2, 3, 1)


class Mixed(nn.Module):
    """BN, channel split/slice (graph outputs with eager's non-dense strides), bilinear
    upsample + pad, SE-style gating, depthwise and transposed convs, a cat on H, a sum."""

    def __init__(self):
        super().__init__()
        self.c, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn, self.dw = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.t = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        y = self.bn(self.c(x))
        a, b = y.split(4, 1)
        z = F.pad(F.interpolate(self.c2(a), scale_factor=2.0, mode="bilinear"), (1, 1, 1, 1))
        w = self.dw(y * torch.sigmoid(F.adaptive_avg_pool2d(y, 1)))
        return b, z, self.t(w), y[:, 2:5], torch.cat([w, w], 2), w.sum()


# ------------------------------------------------------------------ helpers
def capture_only(model, *inputs):
    """The captured ATen graph (weights frozen), before any pass."""
    torch.manual_seed(0)
    lifted, weights = lift_module(model.eval())
    with torch.no_grad():
        return capture(lifted, weights() + list(inputs), freeze=True).gm


def run_pass(gm):
    report = Report()
    result = propagate_layout(gm, options=Options(), report=report)
    verify(result.graph_module)
    return result, report


def sketch(gm, names=("x", "y")) -> str:
    """One line per op: ``name = op(activation inputs)``; weights and literals omitted."""
    lines = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            op = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            ins = [a.name for a in n.all_input_nodes if a.op != "get_attr"]
            if n.kwargs.get("memory_format") is CL:
                op = "to_nhwc"
            elif n.kwargs.get("memory_format") is torch.contiguous_format:
                op = "to_nchw"
            lines.append(f"{n.name} = {op}({', '.join(ins)})")
        elif n.op == "output":
            lines.append(f"return {', '.join(a.name for a in tree_leaves(n.args) if hasattr(a, 'name'))}")
    text = "\n".join(lines)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for p, new in zip(placeholders, names):
        text = re.sub(rf"\b{p}(?![0-9])", new, text)
    return text


def conversions(gm) -> list:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and "memory_format" in n.kwargs
            and n.target is torch.ops.aten.clone.default]


def assert_boundaries_once(gm, report):
    """Conversions are exactly the report's region boundaries, each value converted at
    most once, none of an already converted value, none that changes nothing."""
    convs = conversions(gm)
    regions = report.where(stage="propagate_layout", action="rewritten")
    counted = sum(int(m.group(1)) + int(m.group(2)) for d in regions
                  for m in [re.search(r"at (\d+) entries \+ (\d+) exits", d.reason)])
    assert len(convs) == counted
    assert len({(c.args[0], c.kwargs["memory_format"]) for c in convs}) == len(convs)
    for c in convs:
        assert c.args[0] not in convs, "a conversion of a conversion"
        fmt = c.kwargs["memory_format"]
        assert not c.args[0].meta["val"].is_contiguous(memory_format=fmt), "a no-op conversion"


def assert_meta_strides_exact(gm):
    """Re-propagate fake tensors and compare *strides* too, size-1 dims included (verify
    skips those). The fake results get the CPU kernels' strides where the two are known to
    differ (``as_cpu_kernel_writes``, as verify does; tests/test_strides.py checks that
    rule against eager's real strides)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = mode.from_tensor(n.meta["val"], static_shapes=True)
        elif n.op == "get_attr":
            env[n] = mode.from_tensor(getattr(gm, n.target), static_shapes=True)
        elif n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            with mode:
                env[n] = as_cpu_kernel_writes(n, n.target(*args, **kwargs), list(args))
    # compared at the end: an in-place op capture left (as_strided_) restrides its input's value
    for n, got in env.items():
        for g, want in zip(tree_leaves(got), tree_leaves(n.meta["val"])):
            if isinstance(g, torch.Tensor):
                assert g.stride() == want.stride(), n.name


class Runner(fx.Interpreter):
    """Runs a pre-lowering graph eagerly and checks each real value's layout against
    meta (fake and real kernels must agree on the ops the pass puts in a region)."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "output":
            return out
        for got, want in zip(tree_leaves(out), tree_leaves(n.meta.get("val"))):
            if isinstance(got, torch.Tensor) and got.dim() == 4 and got.numel():
                assert got.is_contiguous(memory_format=CL) == want.is_contiguous(memory_format=CL), n.name
        return out


# ------------------------------------------------------------------ goldens
GOLDENS = {
    "conv_relu_conv": (ConvReluConv, 1, 2, """
x_nhwc = to_nhwc(x)
conv_default = conv(x_nhwc)
relu = relu(conv_default)
conv_default_1 = conv(relu)
conv_default_1_nchw = to_nchw(conv_default_1)
return conv_default_1_nchw"""),
    "conv_pool_flatten_linear": (ConvPoolFlattenLinear, 1, 2, """
x_nhwc = to_nhwc(x)
conv_default = conv(x_nhwc)
relu = relu(conv_default)
max_pool2d_with_indices = max_pool2d_with_indices(relu)
getitem = getitem(max_pool2d_with_indices)
getitem_nchw = to_nchw(getitem)
view = view(getitem_nchw)
linear = linear(view)
return linear"""),
    # [N,C,1,1] is channels-last and contiguous at once: the flatten needs no conversion
    "conv_gap_flatten_linear": (lambda: ConvPoolFlattenLinear(gap=True), 1, 1, """
x_nhwc = to_nhwc(x)
conv_default = conv(x_nhwc)
relu = relu(conv_default)
mean = mean(relu)
view = view(mean)
linear = linear(view)
return linear"""),
    # x is converted once for both branches
    "branches_add": (BranchesAdd, 1, 2, """
x_nhwc = to_nhwc(x)
conv_default = conv(x_nhwc)
relu = relu(conv_default)
conv_default_1 = conv(x_nhwc)
add = add(relu, conv_default_1)
add_nchw = to_nchw(add)
return add_nchw"""),
    "branches_cat": (BranchesCat, 1, 2, """
x_nhwc = to_nhwc(x)
conv_default = conv(x_nhwc)
conv_default_1 = conv(x_nhwc)
sigmoid = sigmoid(conv_default_1)
cat = cat(conv_default, sigmoid)
conv_default_2 = conv(cat)
conv_default_2_nchw = to_nchw(conv_default_2)
return conv_default_2_nchw"""),
    # relu is both a graph output (eager's contiguous strides) and conv2's input (NHWC)
    "output_inside_region": (OutputInside, 1, 3, """
x_nhwc = to_nhwc(x)
conv_default = conv(x_nhwc)
relu = relu(conv_default)
relu_nchw = to_nchw(relu)
conv_default_1 = conv(relu)
conv_default_1_nchw = to_nchw(conv_default_1)
return relu_nchw, conv_default_1_nchw"""),
    # x + y is converted once, not x and y each; the permute gets eager's layout back
    "sum_into_conv": (SumIntoConv, 2, 2, """
add = add(x, y)
add_nhwc = to_nhwc(add)
conv_default = conv(add_nhwc)
relu = relu(conv_default)
conv_default_1 = conv(relu)
conv_default_1_nchw = to_nchw(conv_default_1)
permute = permute(conv_default_1_nchw)
return permute"""),
}


def _inputs(n, fmt=torch.contiguous_format, batch=2, size=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
            for _ in range(n)]


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_golden(name):
    make, n_in, boundaries, expected = GOLDENS[name]
    gm = capture_only(make(), *_inputs(n_in))
    before = sketch(gm)
    assert "to_nhwc" not in before and "to_nchw" not in before
    result, report = run_pass(gm)
    after = sketch(result.graph_module)
    assert after == expected.strip(), f"\n--- before\n{before}\n--- after\n{after}"
    # the expected graph is the input graph plus conversions, nothing else
    without = [l for l in after.splitlines() if "= to_nhwc(" not in l and "= to_nchw(" not in l]
    assert re.sub(r"\b(\w+?)_(nhwc|nchw)\b", r"\1", "\n".join(without)) == before
    assert len(conversions(result.graph_module)) == boundaries
    assert_boundaries_once(result.graph_module, report)
    assert_meta_strides_exact(result.graph_module)
    [region] = report.where(stage="propagate_layout", rule="region")
    assert region.action == "rewritten" and "conv FLOPs" in region.reason


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_golden_graph_runs_like_eager(name):
    make, n_in, _, _ = GOLDENS[name]
    model = make().eval()
    xs = _inputs(n_in)
    gm = capture_only(model, *xs)
    gm = run_pass(gm)[0].graph_module
    with torch.no_grad():
        got, want = Runner(gm).run(*xs), model(*xs)
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        assert_close(g, w)
        assert g.stride() == w.stride()


def test_graph_without_conv_stays_exactly_as_it_was():
    gm = capture_only(NoConv(), *_inputs(1))
    before, code = str(gm.graph), gm.code
    result, report = run_pass(gm)
    assert not result.modified
    assert str(result.graph_module.graph) == before and result.graph_module.code == code
    assert report.where(stage="propagate_layout") == []


def test_lone_conv_region_is_declined_by_the_cost_rule():
    """Converting the input and output of one conv costs what it saves: declined."""
    gm = capture_only(LoneConv(), *_inputs(1))
    before = str(gm.graph)
    result, report = run_pass(gm)
    assert not result.modified and str(result.graph_module.graph) == before
    [region] = report.where(stage="propagate_layout", rule="region")
    assert region.action == "declined" and region.node == "arg2_1"
    assert "rule: converted < saved" in region.reason


@pytest.mark.parametrize("name", ["conv_relu_conv", "output_inside_region", "branches_cat"])
def test_channels_last_input_needs_no_conversion(name):
    """Eager on NHWC inputs returns NHWC: the region already is; nothing to convert."""
    make, n_in, _, _ = GOLDENS[name]
    gm = capture_only(make(), *_inputs(n_in, CL))
    before = str(gm.graph)
    result, report = run_pass(gm)
    assert conversions(result.graph_module) == [] and str(result.graph_module.graph) == before
    assert report.where(stage="propagate_layout", rule="region")[0].action == "rewritten"


# ------------------------------------------------------------------ end to end
MODELS = {k: v[0] for k, v in GOLDENS.items()} | {"no_conv": NoConv, "lone_conv": LoneConv}


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_optimized_matches_eager_values_and_strides(name, fmt):
    """Whole pipeline (folding, fusion, layout, onednn lowering, prepacking)."""
    model = MODELS[name]().eval()
    n_in = GOLDENS[name][1] if name in GOLDENS else 1
    xs = _inputs(n_in, fmt)
    opt = optimize(model, xs)
    with torch.no_grad():
        got, want = opt(*xs), model(*xs)
    assert not [d for d in opt.fusepass_report.decisions if d.action == "error"], opt.fusepass_report
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        assert_close(g, w)
        assert g.stride() == w.stride(), (g.stride(), w.stride())


@settings(max_examples=examples(10))
@given(batch=st.integers(1, 3), size=st.integers(2, 9), cl=st.booleans(),
       name=st.sampled_from(["branches_cat", "output_inside_region", "sum_into_conv"]))
def test_layout_pass_numerics_on_drawn_shapes(batch, size, cl, name):
    make, n_in, _, _ = GOLDENS[name]
    model = make().eval()
    xs = _inputs(n_in, CL if cl else torch.contiguous_format, batch, size)
    gm = run_pass(capture_only(model, *xs))[0].graph_module
    with torch.no_grad():
        got, want = Runner(gm).run(*xs), model(*xs)
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        assert_close(g, w)
        assert g.stride() == w.stride()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_mixed_ops_match_eager(fmt):
    torch.manual_seed(0)
    model = Mixed().eval()
    xs = _inputs(1, fmt)
    gm, report = run_pass(capture_only(model, *xs))
    gm = gm.graph_module
    assert_boundaries_once(gm, report)
    assert_meta_strides_exact(gm)
    opt = optimize(model, xs)
    with torch.no_grad():
        want = model(*xs)
        for got in (Runner(gm).run(*xs), opt(*xs)):
            for g, w in zip(tree_leaves(got), tree_leaves(want)):
                assert_close(g, w)
                assert g.stride() == w.stride()


def test_resnet_is_one_region_with_one_conversion():
    m = models.build("resnet18")
    x = models.example_input("resnet18", 1, 64)
    opt = optimize(m, [x])
    convs = conversions(opt)
    assert [c.kwargs["memory_format"] for c in convs] == [CL]  # the input; GAP output is both
    [region] = opt.fusepass_report.where(stage="propagate_layout", rule="region")
    assert region.action == "rewritten"
    with torch.no_grad():
        assert_close(opt(x), m(x))


@pytest.mark.parametrize("disable", [["propagate_layout"], ["propagate_layout", "prepack_weights"]])
def test_disable_propagate_layout(disable):
    m = ConvReluConv().eval()
    x = _inputs(1)[0]
    opt = optimize(m, [x], disable=disable)
    assert conversions(opt) == []
    assert opt.fusepass_report.where(stage="propagate_layout") == []
    with torch.no_grad():
        assert_close(opt(x), m(x))
