"""The ipex lowering target (needs intel_extension_for_pytorch, i.e. ``make test-ipex``).

Every row of ``fusepass/lowering/ipex.py``'s table: the IPEX kernel is used (the report
and the graph say so) and the result matches eager PyTorch, fp32 and bf16; what IPEX
cannot do exactly falls back to the onednn target or the reference kernel, reported;
``accumu`` is never a tensor anyone else can see; ``lowering="auto"`` picks IPEX; and a
ResNet-style net runs end to end through ``torch.compile(backend="fusepass")``.

Rows whose chain no pattern produces yet (``silu+add``, linear ``hardtanh``...) are
reached through ``Direct``: a module that calls the fusepass op with an explicit chain.
Expected values always come from eager PyTorch (``EAGER``), never from fusepass.
"""
from __future__ import annotations

import copy

import pytest

pytest.importorskip(
    "intel_extension_for_pytorch",
    reason="IPEX is not installed in this env: the ipex target is tested in the IPEX env "
           "(make ipex-env && make test-ipex)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fusepass  # noqa: E402
from bench import zoo as models  # noqa: E402
from fusepass.capture import capture, lift_module  # noqa: E402
from fusepass.lowering import ipex as ipex_target  # noqa: E402
from fusepass.lowering.table import Form, entry  # noqa: E402
from tests.util import (NATIVE_BF16, assert_close, examples, histogram,  # noqa: E402
                        needs_native_bf16, optimize)

# bf16 IPEX kernels need native bf16 (the lowering table declines bf16 elsewhere, tested in
# tests/test_bf16.py): the bf16 cases run where the CPU has it and say why they skip
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bf16)]
DRAWN_DTYPES = [torch.float32] + ([torch.bfloat16] if NATIVE_BF16 else [])
CL = {4: torch.channels_last, 5: torch.channels_last_3d}

# post-op -> (scalars of the fusepass chain, eager function of y)
UNARY = {
    "relu": ([], F.relu),
    "sigmoid": ([], torch.sigmoid),
    "tanh": ([], torch.tanh),
    "silu": ([], F.silu),
    "hardswish": ([], F.hardswish),
    "hardsigmoid": ([], F.hardsigmoid),
    "gelu": ([], F.gelu),
    "gelu_tanh": ([], lambda y: F.gelu(y, approximate="tanh")),
    "hardtanh": ([-0.5, 0.75], lambda y: F.hardtanh(y, -0.5, 0.75)),
    "leaky_relu": ([0.2], lambda y: F.leaky_relu(y, 0.2)),
    "elu": ([1.3, 1.0, 1.0], lambda y: F.elu(y, 1.3)),
}
# binary chains -> eager function of (y, other)
BINARY = {
    ("add",): lambda y, o: y + o,
    ("sub",): lambda y, o: y - o,
    ("add", "relu"): lambda y, o: F.relu(y + o),
    ("sub", "relu"): lambda y, o: F.relu(y - o),
    ("silu", "add"): lambda y, o: F.silu(y) + o,
    ("silu", "sub"): lambda y, o: F.silu(y) - o,
    ("mul",): lambda y, o: y * o,
}
RUN = {  # chain -> run-op infix the table must pick
    ("add",): "add", ("sub",): "add", ("add", "relu"): "add_relu", ("sub", "relu"): "add_relu",
    ("silu", "add"): "swish_add", ("silu", "sub"): "swish_add", ("mul",): "mul",
}
CONV_BINARY = [c for c in BINARY if c != ("mul",)]
LINEAR_BINARY = [("add",), ("sub",), ("add", "relu"), ("sub", "relu"), ("mul",)]


def infix(post):
    return {"silu": "swish", "gelu_tanh": "gelu"}.get(post, post)


class Direct(torch.nn.Module):
    """``fusepass::conv`` / ``fusepass::linear`` with an explicit chain.

    family: conv1d/conv2d/conv3d/conv_transpose2d/linear. With ``other="input"`` the
    binary operand is the second graph input; with ``other="inner"`` it is computed in
    the graph (``x2 * 2``) and dead after the op; with ``other="kept"`` it is computed
    and also returned."""

    def __init__(self, family, post=(), scalars=(), cin=4, cout=6, k=3, stride=1, padding=1,
                 dilation=1, groups=1, output_padding=0, bias=True, other=None):
        super().__init__()
        self.family, self.post, self.scalars, self.other = family, list(post), list(scalars), other
        self.transposed = family.startswith("conv_transpose")
        if family == "linear":
            w = torch.randn(cout, cin) / cin ** 0.5
        else:
            rank = int(family[-2])
            shape = (cin, cout // groups) if self.transposed else (cout, cin // groups)
            w = torch.randn(*shape, *[k] * rank) / (cin * k ** rank / groups) ** 0.5
            self.conv_args = ([stride] * rank, [padding] * rank, [dilation] * rank,
                              self.transposed, [output_padding] * rank, groups)
        self.weight = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(torch.randn(cout) * 0.1) if bias else None

    def forward(self, x, x2=None):
        other = None
        if self.other == "input":
            other = x2
        elif self.other in ("inner", "kept"):
            other = x2 * 2
        if self.family == "linear":
            y = torch.ops.fusepass.linear(x, self.weight, self.bias, other, self.post, self.scalars)
        else:
            stride, padding, dilation, transposed, output_padding, groups = self.conv_args
            y = torch.ops.fusepass.conv(x, self.weight, self.bias, stride, padding, dilation,
                                        transposed, output_padding, groups, other, self.post,
                                        self.scalars)
        return (y, other) if self.other == "kept" else y

    def base(self, x):
        """The conv/linear alone, in plain eager PyTorch."""
        if self.family == "linear":
            return F.linear(x, self.weight, self.bias)
        stride, padding, dilation, transposed, output_padding, groups = self.conv_args
        rank = len(stride)
        if transposed:
            return getattr(F, f"conv_transpose{rank}d")(x, self.weight, self.bias, stride, padding,
                                                         output_padding, groups, dilation)
        return getattr(F, f"conv{rank}d")(x, self.weight, self.bias, stride, padding, dilation,
                                          groups)

    def eager(self, x, x2=None):
        """The whole computation in plain eager PyTorch."""
        y = self.base(x)
        if not self.post:
            return y
        if len(self.post) == 1 and self.post[0] in UNARY:
            if self.post[0] == "elu":
                a, s, i = self.scalars
                return F.elu(y, a) if (s, i) == (1.0, 1.0) else torch.ops.aten.elu(y, a, s, i)
            return UNARY[self.post[0]][1](y)
        other = x2 if self.other == "input" else x2 * 2
        out = BINARY[tuple(self.post)](y, other)
        return (out, other) if self.other == "kept" else out


def example(family, batch=2, cin=4, size=7, dtype=torch.float32):
    shape = {"conv1d": (batch, cin, size), "conv2d": (batch, cin, size, size),
             "conv_transpose2d": (batch, cin, size, size),
             "conv3d": (batch, cin, 4, size, size), "linear": (batch, 5, cin)}[family]
    return torch.randn(shape).to(dtype)


def out_like(m, x):
    """A random tensor shaped and laid out like the conv/linear output."""
    with torch.no_grad():
        y = m.base(x)
    return torch.randn(y.shape, dtype=y.dtype).contiguous(memory_format=_format(y))


def _format(t):
    if t.dim() in CL and t.is_contiguous(memory_format=CL[t.dim()]) and not t.is_contiguous():
        return CL[t.dim()]
    return torch.contiguous_format


def lowered(gm):
    return gm.fusepass_report.where(stage="lower", action="lowered")


# ----------------------------------------------------------------- unary rows

UNARY_CASES = [(f, p) for f in ("conv2d", "conv3d", "linear", "conv_transpose2d")
               for p in [None, *UNARY]]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,post", UNARY_CASES, ids=[f"{f}.{p}" for f, p in UNARY_CASES])
def test_unary_row_uses_the_ipex_kernel_and_matches_eager(family, post, dtype):
    torch.manual_seed(0)
    scalars = UNARY[post][0] if post else []
    kw = dict(stride=2, output_padding=1) if family.startswith("conv_transpose") else {}
    m = Direct(family, [post] if post else [], scalars, **kw).eval().to(dtype)
    x = example(family, dtype=dtype)
    gm = optimize(m, [x], lowering="ipex")
    prefix = {"conv2d": "convolution", "conv3d": "convolution", "linear": "linear",
              "conv_transpose2d": "conv_transpose"}[family]
    kernel = f"ipex_prepack.{prefix}_{infix(post)}_run" if post else f"ipex_prepack.{prefix}_run"
    assert gm.fusepass_report.kernels == {kernel: 1}, gm.fusepass_report
    hist = histogram(gm)
    assert hist[kernel] == 1 and hist["fusepass.conv"] == hist["fusepass.linear"] == 0, hist
    with torch.no_grad():
        want, got = m.eager(x), gm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.stride() == want.stride()
    assert_close(got, want, dtype)


# ----------------------------------------------------------------- binary rows

BINARY_CASES = [("conv2d", c) for c in CONV_BINARY] + [("conv3d", ("add", "relu"))] + \
               [("linear", c) for c in LINEAR_BINARY]


@pytest.mark.parametrize("where", ["input", "inner", "kept"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,chain", BINARY_CASES,
                         ids=[f"{f}.{'+'.join(c)}" for f, c in BINARY_CASES])
def test_binary_row_uses_the_ipex_kernel_and_never_clobbers_a_live_tensor(family, chain, dtype,
                                                                         where):
    torch.manual_seed(0)
    m = Direct(family, chain, other=where).eval().to(dtype)
    x = example(family, dtype=dtype)
    x2 = out_like(m, x)
    x2_before = x2.clone()
    gm = optimize(m, [x, x2], lowering="ipex")
    prefix = "linear" if family == "linear" else "convolution"
    kernel = f"ipex_prepack.{prefix}_{RUN[chain]}_run"
    assert gm.fusepass_report.kernels == {kernel: 1}, gm.fusepass_report
    with torch.no_grad():
        want, got = m.eager(x, x2), gm(x, x2)
    torch.testing.assert_close(x2, x2_before, rtol=0, atol=0)  # the caller's tensor is intact
    assert_close(got, want, dtype)
    if chain != ("mul",):
        (d,) = lowered(gm)
        clones = histogram(gm)["aten.clone"]
        if where == "inner":
            assert "in place into" in d.reason and clones == 0, (d.reason, histogram(gm))
        else:
            assert "clone of" in d.reason and clones >= 1, (d.reason, histogram(gm))
            assert ("graph input" if where == "input" else "graph output") in d.reason


def test_other_that_is_also_the_conv_input_is_cloned():
    """conv(x) + x: writing into x while the convolution reads it would be wrong."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.a(x))
            return self.b(y) + y

    torch.manual_seed(0)
    m, x = M().eval(), torch.randn(2, 4, 8, 8)
    gm = optimize(m, [x], lowering="ipex")
    assert gm.fusepass_report.kernels == {"ipex_prepack.convolution_relu_run": 1,
                                          "ipex_prepack.convolution_add_run": 1}
    assert any("clone of" in d.reason for d in lowered(gm))
    with torch.no_grad():
        assert_close(gm(x), m(x))


# ----------------------------------------------------------------- fallbacks

@pytest.mark.parametrize("case,kernel,reason", [
    # IPEX cannot, onednn can: the onednn kernel, and the report says why
    (dict(family="conv2d", post=["mul"], other="input"), "mkldnn._convolution_pointwise.binary",
     "ipex has no conv+mul post-op"),
    (dict(family="conv1d", post=["relu"]), "mkldnn._convolution_pointwise", "conv1d"),
    (dict(family="linear", post=["add", "relu"], other="input", bias=False), None, None),
], ids=["conv-mul", "conv1d", "linear-add-relu(control)"])
def test_what_ipex_lacks_goes_to_onednn_reported(case, kernel, reason):
    torch.manual_seed(0)
    m = Direct(**case).eval()
    x = example(case["family"])
    args = [x, out_like(m, x)] if case.get("other") else [x]
    gm = optimize(m, args, lowering="ipex")
    (d,) = gm.fusepass_report.where(stage="lower")
    if kernel is None:  # control: IPEX takes it
        assert d.rule.startswith("ipex_prepack."), d
    else:
        assert d.rule == kernel and d.action == "lowered", d
        # "<chain>; ipex: <why not>; onednn instead[; <form note>]"
        why_not = d.reason.split("ipex: ", 1)[-1]
        assert "ipex: " in d.reason and reason in why_not and "onednn instead" in why_not, d.reason
    with torch.no_grad():
        assert_close(gm(*args), m.eager(*args))


@pytest.mark.expect_kept
@pytest.mark.parametrize("case,reason", [
    (dict(family="conv2d", post=["elu"], scalars=[1.0, 1.0507, 1.6733]), "onednn has no conv+elu"),  # SELU
    (dict(family="conv2d", post=["add"], other="bcast"), "shape"),
    (dict(family="conv_transpose2d", post=["add"], other="input", stride=2, output_padding=1),
     "transposed"),
], ids=["elu-scale", "broadcast-other", "conv-transpose-add"])
def test_what_neither_target_takes_stays_on_the_reference_kernel(case, reason):
    torch.manual_seed(0)
    bcast = case.get("other") == "bcast"
    if bcast:
        case = {**case, "other": "input"}
    m = Direct(**case).eval()
    x = example(case["family"])
    args = [x]
    if case.get("other"):
        args.append(torch.randn(1, 6, 1, 1) if bcast else out_like(m, x))
    gm = optimize(m, args, lowering="ipex")
    # the chain is split: the conv runs on a kernel, the post-op as ATen after it
    (d,) = gm.fusepass_report.where(stage="lower", action="kept")
    assert reason in d.reason, d
    assert sum(gm.fusepass_report.kernels.values()) == 1, gm.fusepass_report
    assert histogram(gm)["fusepass.conv"] == 0
    with torch.no_grad():
        assert_close(gm(*args), m.eager(*args))


def fused_node(m, args):
    """The captured graph of ``m`` (frozen weights, no passes) and its one fused op."""
    lifted, weights = lift_module(torch.fx.symbolic_trace(m))
    with torch.no_grad():
        gm = capture(lifted, weights() + list(args), freeze=True).gm
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.fusepass.conv.default, torch.ops.fusepass.linear.default)]
    return gm, node


@pytest.mark.parametrize("m,bcast,reason", [
    (Direct("conv2d", ["elu"], [1.0, 2.0, 1.0]), False, "IPEX's elu ignores scale and input_scale"),
    (Direct("linear", ["elu"], [1.0, 1.0, 0.5]), False, "IPEX's elu ignores scale and input_scale"),
    (Direct("conv2d", ["add"], other="input"), True, "needs other with the output's full shape"),
    (Direct("linear", ["mul"], other="input"), True, "linear_mul_run needs other with the output's full shape"),
    (Direct("conv_transpose2d", ["add"], other="input"), False,
     "IPEX's conv_transpose add runs give wrong results"),
    (Direct("conv2d", ["mul"], other="input"), False, "ipex has no conv+mul post-op"),
    (Direct("linear", ["add", "relu"], other="inner").double(), False, "no ipex linear kernel for dtype torch.float64"),
    (Direct("conv1d", ["relu"]), False, "conv1d writes an (N, L, C)-strided output"),
], ids=["conv-elu-scale", "linear-elu-input-scale", "conv-bcast-add", "linear-bcast-mul",
        "conv-transpose-add", "conv-mul", "float64", "conv1d"])
def test_the_ipex_table_declines_with_a_reason_and_leaves_the_graph_alone(m, bcast, reason):
    torch.manual_seed(0)
    m.eval()
    x = example(m.family, dtype=m.weight.dtype)
    args = [x]
    if m.other:
        y = out_like(m, x)
        args.append(y[..., :1] if bcast else y)
    gm, node = fused_node(m, args)
    before = str(gm.graph)
    e, out = entry("ipex", Form.of_node(node), late=True)  # what lowering asks the table
    if e is not None:  # what only the builder can see (a broadcast operand): it declines
        out = e.build(gm, node)  # before it mutates
    assert isinstance(out, str) and reason in out, (reason, out)
    assert str(gm.graph) == before


# ----------------------------------------------------------------- eager spellings, end to end

class Block(torch.nn.Module):
    def __init__(self, kind, post, cin=4, cout=6):
        super().__init__()
        self.op = torch.nn.Linear(cin, cout) if kind == "linear" else torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.post = post

    def forward(self, x):
        return self.post(self.op(x))


SPELLINGS = {
    "conv2d": {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
               "hardswish": F.hardswish, "elu": lambda y: F.elu(y, 0.7),
               "leaky_relu": lambda y: F.leaky_relu(y, 0.1), "sigmoid": torch.sigmoid},
    "linear": {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
               "silu": F.silu, "tanh": torch.tanh},
}
SPELLING_CASES = [(k, s) for k, d in SPELLINGS.items() for s in d]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,spelling", SPELLING_CASES, ids=[f"{k}.{s}" for k, s in SPELLING_CASES])
def test_eager_spelling_is_fused_then_lowered_to_ipex(kind, spelling, dtype):
    torch.manual_seed(0)
    m = Block(kind, SPELLINGS[kind][spelling]).eval().to(dtype)
    x = (torch.randn(2, 5, 4) if kind == "linear" else torch.randn(2, 4, 8, 8)).to(dtype)
    gm = optimize(m, [x], lowering="ipex")
    rep = gm.fusepass_report
    assert sum(rep.counts.values()) >= 1, rep
    (kernel,) = rep.kernels
    assert kernel.startswith("ipex_prepack.") and kernel.endswith("_run") and \
        kernel not in ("ipex_prepack.convolution_run", "ipex_prepack.linear_run"), rep
    with torch.no_grad():
        assert_close(gm(x), m(x), dtype)


@settings(max_examples=examples(20))
@given(st.sampled_from([None, *UNARY]), st.sampled_from([1, 2]), st.integers(1, 3),
       st.integers(1, 2), st.integers(0, 2), st.integers(1, 2), st.integers(1, 3),
       st.sampled_from(DRAWN_DTYPES), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_conv2d_shapes_and_layouts_vs_eager(post, groups, k, stride, padding, dilation, batch,
                                            dtype, channels_last, bias, seed):
    torch.manual_seed(seed)
    scalars = UNARY[post][0] if post else []
    m = Direct("conv2d", [post] if post else [], scalars, cin=4, cout=8, k=k, stride=stride,
               padding=padding, dilation=dilation, groups=groups, bias=bias).eval().to(dtype)
    size = dilation * (k - 1) + 1 + 5
    x = example("conv2d", batch, 4, size, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gm = optimize(m, [x], lowering="ipex")
    assert all(k.startswith("ipex_prepack.") for k in gm.fusepass_report.kernels), gm.fusepass_report
    with torch.no_grad():
        want, got = m.eager(x), gm(x)
    assert got.stride() == want.stride()
    assert_close(got, want, dtype)


# ----------------------------------------------------------------- contexts

def test_a_shared_weight_gets_one_context_and_its_plain_copy_is_dropped():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(F.relu(self.conv(x)))

    torch.manual_seed(0)
    m, x = Twice().eval(), torch.randn(1, 4, 8, 8)
    gm = optimize(m, [x], lowering="ipex")
    ctxs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(ipex_target.CTX_PREFIX)]
    assert len(ctxs) == 1 and len(ctxs[0].users) == 2
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and not n.target.startswith(ipex_target.CTX_PREFIX)]
    with torch.no_grad():
        assert_close(gm(x), m(x))
        # the lowered graph deep-copies with its contexts (as a plain GraphModule: the
        # runtime state of OptimizedGraphModule is not this target's business)
        plain = torch.fx.GraphModule(gm, gm.graph)
        assert_close(copy.deepcopy(plain)(x), m(x))


def test_a_context_serves_other_batch_sizes():
    torch.manual_seed(0)
    m = Direct("conv2d", ["relu"]).eval()
    gm = optimize(m, [example("conv2d", batch=1)], lowering="ipex")
    x = example("conv2d", batch=5)
    with torch.no_grad():
        assert_close(gm(x), m.eager(x))


def test_a_changed_source_weight_is_repacked():
    """The context holds its own copy of the weight: an in-place update of the parameter
    must rebuild it (the runtime's freshness check), not run on the stale copy."""
    torch.manual_seed(0)
    m = Block("conv2d", F.relu).eval()
    x = torch.randn(2, 4, 8, 8)
    gm = optimize(m, [x], lowering="ipex")
    with torch.no_grad():
        assert_close(gm(x), m(x))
        m.op.weight.mul_(-1.5)
        assert_close(gm(x), m(x))


@pytest.mark.parametrize("family,post", [("conv3d", ["relu"]), ("conv3d", ["add", "relu"]),
                                         ("conv_transpose2d", ["silu"]), ("conv2d", ["silu", "add"])])
def test_channels_last_input_keeps_eager_strides(family, post):
    torch.manual_seed(0)
    binary = post[0] in ("add", "sub") or len(post) > 1
    kw = dict(stride=2, output_padding=1) if family.startswith("conv_transpose") else {}
    m = Direct(family, post, other="input" if binary else None, **kw).eval()
    x = example(family)
    x = x.contiguous(memory_format=CL[x.dim()])
    args = [x, out_like(m, x)] if binary else [x]
    gm = optimize(m, args, lowering="ipex")
    assert all(k.startswith("ipex_prepack.") for k in gm.fusepass_report.kernels), gm.fusepass_report
    with torch.no_grad():
        want, got = m.eager(*args), gm(*args)
    assert got.stride() == want.stride()
    assert_close(got, want)


# ----------------------------------------------------------------- auto, end to end

def test_auto_picks_ipex():
    torch.manual_seed(0)
    m = Direct("conv2d", ["relu"]).eval()
    x = example("conv2d")
    gm = optimize(m, [x], lowering="auto")
    rep = gm.fusepass_report
    assert any("lowering='auto' chose 'ipex'" in d.reason for d in rep.where(stage="lower", action="info"))
    assert rep.kernels == {"ipex_prepack.convolution_relu_run": 1}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_resnet_style_net_through_the_backend_on_ipex(fresh_dynamo, dtype):
    m = models.build("resnet18").to(dtype)
    x = models.example_input("resnet18", 2, resolution=64).to(dtype)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="fusepass", options={"lowering": "ipex"})(x)
    assert want.float().std() > 0.05
    assert_close(got, want, dtype)
    rep = fusepass.explain(m, x, lowering="ipex")
    ipex_kernels = {k: v for k, v in rep.kernels.items() if k.startswith("ipex_prepack.")}
    assert sum(v for k, v in ipex_kernels.items() if "convolution" in k) == 20, rep.summary()
    assert ipex_kernels.get("ipex_prepack.linear_run") == 1, rep.summary()
    assert not any(k.startswith("mkldnn.") for k in rep.kernels), rep.summary()
