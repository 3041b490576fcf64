"""INT8: PT2E's quantize/dequantize graphs -> fusepass::qconv/qlinear -> oneDNN int8 kernels.

Rows are exercised on hand-built q/dq graphs (the exact spelling ``convert_pt2e`` emits:
``quantized_decomposed`` per-tensor activations, per-channel symmetric s8 weights), every
row and chain kind in every run (pytest parameters), shapes drawn by hypothesis. Oracles:
the module run eagerly (the q/dq decomposition) and the reference lowering. Tolerances are
derived: a float output may differ by the fp32 rounding of its dot products (``K`` terms:
at most ``K * eps * sum |terms|``); a requantized output by one quantization step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusepass
from fusepass.lowering.onednn import binary_one_channel_works
from fusepass.ops import quantized_decomposed
from fusepass.patterns.quantized import vnni
from tests.util import examples, histogram

qd = quantized_decomposed()
U8 = torch.uint8
EPS = torch.finfo(torch.float32).eps

CONV_POST = {"none": lambda y: y, "relu": F.relu, "relu6": lambda y: F.hardtanh(y, 0.0, 6.0),
             "hardswish": F.hardswish, "silu": F.silu}
LINEAR_POST = {**CONV_POST, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
               "tanh": torch.tanh, "leaky_relu": lambda y: F.leaky_relu(y, 0.1)}


def affine(t, hi):
    """u8 scale/zero point covering ``t`` (and 0) in 0..hi."""
    lo_v, hi_v = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    scale = max((hi_v - lo_v) / hi, 1e-6)
    return scale, int(min(max(round(-lo_v / scale), 0), hi))


def q(t, s, z, hi):
    return qd.quantize_per_tensor.default(t, s, z, 0, hi, U8)


def dq(t, s, z, hi):
    return qd.dequantize_per_tensor.default(t, s, z, 0, hi, U8)


class QOp(nn.Module):
    """dequantize(quantize(x)) -> conv/linear(., dequantize(w_s8)) [+ residual] -> post ->
    [quantize -> dequantize]: what convert_pt2e makes of one layer."""

    def __init__(self, layer, post, x_hi, residual, requant, sample, other=None, w_zp=0,
                 variant=None):
        super().__init__()
        self.layer, self.post, self.x_hi, self.variant = layer, post, x_hi, variant
        self.register_buffer("wf", layer.weight.detach().clone())
        self.residual, self.requant = residual, requant
        w = layer.weight.detach()
        dims = tuple(range(1, w.dim()))
        ws = (w.abs().amax(dim=dims) / 127).clamp_min(1e-6)
        wz = torch.full((w.shape[0],), w_zp, dtype=torch.int64)
        self.register_buffer("wq", qd.quantize_per_channel.default(w, ws, wz, 0, -128, 127, torch.int8))
        self.register_buffer("ws", ws)
        self.register_buffer("wz", wz)
        self.register_buffer("b", layer.bias.detach().clone())
        self.xq = affine(sample, x_hi)
        if variant == "dynamic":  # the bound's qparams: the per-call ones of the sample
            s, z = qd.choose_qparams.tensor(sample, 0, x_hi, 2.0 ** -12, U8)
            self.xq = (float(s), int(z))
        self.rq = affine(other, 127) if other is not None else None
        self.oq = None
        with torch.no_grad():
            self.oq = affine(self.float_out(sample, other), 127)

    def compute(self, xd, wd, b=True):
        b = self.b if b is True else b
        if isinstance(self.layer, nn.Linear):
            return F.linear(xd, wd, b)
        c = self.layer
        return F.conv2d(xd, wd, b, c.stride, c.padding, c.dilation, c.groups)

    def float_out(self, x, r):
        if self.variant == "dynamic":  # per-call qparams, as convert_pt2e(is_dynamic) spells it
            qp = qd.choose_qparams.tensor(x, 0, self.x_hi, 2.0 ** -12, U8)
            s, z = qp[0], qp[1]
            xd = qd.dequantize_per_tensor.tensor(qd.quantize_per_tensor.tensor(
                x, s, z, 0, self.x_hi, U8), s, z, 0, self.x_hi, U8)
        elif self.variant == "s8_activation":
            xd = qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(
                x, 0.05, 0, -128, 127, torch.int8), 0.05, 0, -128, 127, torch.int8)
        else:
            xd = dq(q(x, *self.xq, self.x_hi), *self.xq, self.x_hi)
        wq = self.wq
        if self.variant == "fold_quantize_false":  # the float weight quantized in the graph
            wq = qd.quantize_per_channel.default(self.wf, self.ws, self.wz, 0, -128, 127, torch.int8)
        wd = qd.dequantize_per_channel.default(wq, self.ws, self.wz, 0, -128, 127, torch.int8)
        y = self.compute(xd, wd)
        if self.residual == "quantized":
            y = y + dq(q(r, *self.rq, 127), *self.rq, 127)
        elif self.residual == "float":
            y = y + r
        return self.post(y)

    def forward(self, x, r):
        y = self.float_out(x, r)
        if self.requant:
            y = dq(q(y, *self.oq, 127), *self.oq, 127)
        return y


def optimize(m, inputs, **opts):
    """Trace with buffers as ``get_attr`` nodes (symbolic_trace would evaluate the weight's
    dequantize over them at trace time), as convert_pt2e's graphs have them; optimize."""
    tracer = torch.fx.Tracer()
    tracer.proxy_buffer_attributes = True
    gm = torch.fx.GraphModule(m, tracer.trace(m))
    with torch.no_grad():
        return fusepass.optimize(gm, list(inputs), **opts)


def dot_bound(m, x, r):
    """Elementwise bound on the fp32 rounding difference of two correct computations of
    the layer: K terms summed, each |x||w|, plus bias and residual (post-ops are at most
    2-Lipschitz)."""
    xd = dq(q(x, *m.xq, m.x_hi), *m.xq, m.x_hi)
    wd = qd.dequantize_per_channel.default(m.wq, m.ws, m.wz, 0, -128, 127, torch.int8)
    k = wd[0].numel()
    mag = m.compute(xd.abs(), wd.abs(), b=m.b.abs())
    if m.residual:
        mag = mag + r.abs()
    return 2 * (k + 2) * EPS * mag + 1e-30


def check_numerics(m, opt, x, r):
    with torch.no_grad():
        want, got = m(x, r), opt(x, r)
    assert got.shape == want.shape and got.dtype == want.dtype
    if m.requant:  # one quantization step of the output scale
        step = m.oq[0]
        assert float((got - want).abs().max()) <= step * (1 + 1e-4), "more than one step off"
    else:
        bound = dot_bound(m, x, r)
        assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() / bound).max())


def quantize_ops(opt, name="quantize_per_tensor"):
    """How many ``quantized_decomposed.<name>`` the graph computes: left as the op, or
    spelled in ATen by the lowering (``lowering/qdq.py`` marks the chain's last node)."""
    h = histogram(opt)
    spelled = sum(n.meta.get("fusepass_spells") == f"quantized_decomposed::{name}"
                  for n in opt.graph.nodes)
    return h[f"quantized_decomposed.{name}"] + spelled


def actions(opt, rule):
    return [(d.action, d.reason) for d in opt.fusepass_report.decisions if d.rule == rule]


conv_shapes = st.fixed_dictionaries({
    "groups": st.sampled_from(["one", "two", "depthwise"]), "cin": st.integers(1, 6),
    "cout": st.integers(1, 6), "k": st.sampled_from([1, 3]), "stride": st.sampled_from([1, 2]),
    "padding": st.sampled_from([0, 1]), "dilation": st.sampled_from([1, 2]),
    "batch": st.sampled_from([1, 2, 3]), "h": st.integers(5, 11), "w": st.integers(5, 11)})


def make_conv(s, seed=0):
    g = {"one": 1, "two": 2, "depthwise": s["cin"] * 2}[s["groups"]]
    cin = s["cin"] * 2 if g > 1 else s["cin"]
    cout = cin if s["groups"] == "depthwise" else s["cout"] * (2 if g == 2 else 1)
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, s["k"], s["stride"], s["padding"], s["dilation"], g)
    x = torch.randn(s["batch"], cin, s["h"], s["w"])
    return conv, x


CONV_CASES = [(post, res, rq) for post in CONV_POST for res, rq in
              [(None, False), (None, True)]] + [
    (post, res, rq) for post in ("none", "relu") for res in ("quantized", "float")
    for rq in (False, True)]


def check_row(m, x, r, rule, kernel, requant):
    """What every int8 row test checks: numerics against the module (the q/dq
    decomposition run eagerly) on the onednn and the reference lowering, one ``kernel``,
    one rewrite by ``rule`` and, if ``requant``, one by its ``.requant`` row."""
    opt = optimize(m, [x, r])
    check_numerics(m, opt, x, r)
    h = histogram(opt)
    assert h[kernel] == 1, h
    assert [a for a, _ in actions(opt, rule)] == ["rewritten"], actions(opt, rule)
    if requant:
        assert [a for a, _ in actions(opt, rule + ".requant")] == ["rewritten"]
    check_numerics(m, optimize(m, [x, r], lowering="reference"), x, r)
    return opt, h


@pytest.mark.parametrize("post,residual,requant", CONV_CASES)
@settings(max_examples=examples(6))
@given(s=conv_shapes)
def test_qconv_rows(post, residual, requant, s):
    conv, x = make_conv(s)
    y_shape = conv(x).shape
    r = torch.randn(y_shape) if residual else torch.zeros(1)  # unused without a residual
    m = QOp(conv, CONV_POST[post], 127, residual, requant, x, r if residual else None).eval()
    ambiguous = (y_shape[1] == 1) != (y_shape[2] * y_shape[3] == 1)
    if residual and ambiguous and not binary_one_channel_works():  # torch 2.8 (IPEX env)
        opt = optimize(m, [x, r])  # the float residual row declines first: no int8 sum
        check_numerics(m, opt, x, r)
        assert any("cannot create the memory" in d.reason for d in opt.fusepass_report.decisions)
        return
    kernel = "onednn.qconv2d_pointwise.binary" if residual else "onednn.qconv_pointwise"
    sums_into_float = requant and residual == "float"  # the sum writes into the residual
    opt, h = check_row(m, x, r, "int8.qconv2d", kernel, requant and not sums_into_float)
    if sums_into_float:  # ... which is not a u8 one: the output stays fp32 and is quantized
        (action, reason), = actions(opt, "int8.qconv2d.requant")
        assert action == "declined" and "residual dtype torch.float32" in reason, reason
        assert quantize_ops(opt) == 2, h  # input's, output's
    elif requant:  # the input's quantize (and the residual's) stay; the output's is the kernel's
        assert quantize_ops(opt) == 1 + (residual is not None), h
    if requant and residual == "quantized":
        assert actions(opt, "int8.qconv2d.qaccum")[0][0] == "rewritten"


linear_shapes = st.fixed_dictionaries({
    "lead": st.sampled_from([(1,), (3,), (2, 5)]), "cin": st.integers(1, 24),
    "cout": st.integers(1, 24)})

LINEAR_CASES = [(post, None, rq) for post in LINEAR_POST for rq in (False, True)] + [
    ("none", "float", False), ("relu", "float", False)]
# dynamic quantization: float output (the next layer quantizes per call again)
DYNAMIC_CASES = [(post, None) for post in LINEAR_POST] + [("none", "float"), ("relu", "float")]


@pytest.mark.parametrize("post,residual,requant", LINEAR_CASES)
@settings(max_examples=examples(4))
@given(s=linear_shapes)
def test_qlinear_rows(post, residual, requant, s):
    torch.manual_seed(0)
    lin = nn.Linear(s["cin"], s["cout"])
    x = torch.randn(*s["lead"], s["cin"])
    r = torch.randn(*s["lead"], s["cout"]) if residual else torch.zeros(1)
    m = QOp(lin, LINEAR_POST[post], 127, residual, requant, x, r if residual else None).eval()
    kernel = "onednn.qlinear_pointwise.binary" if residual else "onednn.qlinear_pointwise"
    check_row(m, x, r, "int8.qlinear", kernel, requant)


@pytest.mark.parametrize("post,residual", DYNAMIC_CASES)
@settings(max_examples=examples(4))
@given(s=linear_shapes)
def test_qlinear_dynamic_rows(post, residual, s):
    """choose_qparams -> quantize/dequantize_per_tensor.tensor -> linear: the per-call
    scale and zero point go to oneDNN's ``.tensor`` kernels as tensors."""
    torch.manual_seed(0)
    lin = nn.Linear(s["cin"], s["cout"])
    x = torch.randn(*s["lead"], s["cin"])
    r = torch.randn(*s["lead"], s["cout"]) if residual else torch.zeros(1)
    m = QOp(lin, LINEAR_POST[post], 127, residual, False, x, r if residual else None,
            variant="dynamic").eval()
    kernel = "onednn.qlinear_pointwise." + ("binary_tensor" if residual else "tensor")
    opt, h = check_row(m, x, r, "int8.qlinear.dynamic", kernel, False)
    assert h["quantized_decomposed.choose_qparams.tensor"] == 1, h  # per call, in the graph
    with torch.no_grad():  # another input: its own qparams, not the sample's
        x2 = 3 * torch.randn_like(x) + 1
        want, got = m(x2, r), opt(x2, r)
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max()) + 1e-5


NO_R = torch.zeros(1)  # the residual input of a layer without one (unused)
BASE = dict(groups="one", cin=3, cout=4, k=3, stride=1, padding=1, dilation=1, batch=2, h=7, w=6)


def test_full_range_activations_follow_the_cpu():
    """0..255 activations: int8 where VNNI accumulates in int32; without VNNI declined
    (oneDNN's int16 pair sums saturate) and run in float, the weight dequantized once."""
    conv, x = make_conv(BASE)
    m = QOp(conv, F.relu, 255, None, False, x).eval()
    opt = optimize(m, [x, NO_R])
    check_numerics(m, opt, x, NO_R)
    (action, reason), = actions(opt, "int8.qconv2d")
    h = histogram(opt)
    if vnni():
        assert action == "rewritten" and h["onednn.qconv_pointwise"] == 1
    else:
        assert action == "declined" and "CPU lacks VNNI" in reason
        assert h["mkldnn._convolution_pointwise"] == 1 and not h["quantized_decomposed.dequantize_per_channel"], h
        assert actions(opt, "int8.dequantized_weight")[0][0] == "rewritten"


@pytest.mark.parametrize("case,expect", [
    ("asymmetric_weight", "asymmetric weight zero point"),
    ("s8_activation", "activation dtype torch.int8"),
])
def test_declines_and_stays_correct(case, expect):
    """Declined with the reason; the layer then runs in float as the graph says."""
    conv, x = make_conv(BASE)
    m = QOp(conv, F.relu, 127, None, False, x, w_zp=3 if case == "asymmetric_weight" else 0,
            variant=case).eval()
    opt = optimize(m, [x, NO_R])
    (action, reason), = actions(opt, "int8.qconv2d")
    assert action == "declined" and expect in reason, reason
    assert not histogram(opt)["onednn.qconv_pointwise"]
    with torch.no_grad():
        want, got = m(x, NO_R), opt(x, NO_R)
    assert bool(((got - want).abs() <= dot_bound(m, x, NO_R)).all())


@pytest.mark.parametrize("where", ["activation", "weight", "output"])
@pytest.mark.parametrize("value", [0.0, float("nan"), -0.5, float("inf")])
def test_a_bad_scale_is_a_clear_error(where, value):
    """A scale of 0, NaN, negative or infinite: eager runs the graph (and divides by it);
    fusepass raises ``GraphError`` naming the quantize/dequantize, through ``optimize``
    and ``torch.compile`` alike, instead of optimizing it or falling back quietly."""
    conv, x = make_conv(BASE)
    m = QOp(conv, F.relu, 127, None, True, x).eval()
    if where == "activation":
        m.xq = (value, m.xq[1])
    elif where == "output":
        m.oq = (value, m.oq[1])
    else:
        m.ws[1] = value
    with pytest.raises(fusepass.GraphError, match="scale must be a positive finite number"):
        optimize(m, [x, NO_R])
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception) as e:
        torch.compile(m, backend="fusepass")(x, NO_R)
    assert "scale must be a positive finite number" in str(e.value), e.value


def test_fold_quantize_false_weights_become_int8_constants():
    """convert_pt2e(fold_quantize=False) keeps the float weight and quantizes it in the
    graph: evaluated once at compile time, then the same int8 kernel."""
    conv, x = make_conv(BASE)
    m = QOp(conv, F.relu, 127, None, True, x, variant="fold_quantize_false").eval()
    opt = optimize(m, [x, NO_R])
    assert histogram(opt)["onednn.qconv_pointwise"] == 1
    assert actions(opt, "int8.quantized_weight")[0][0] == "rewritten"
    check_numerics(m, opt, x, NO_R)


def test_ipex_lowering_says_onednn_serves_int8():
    pytest.importorskip("intel_extension_for_pytorch", reason="IPEX not installed (make test-ipex)")
    conv, x = make_conv(BASE)
    m = QOp(conv, F.relu, 127, None, True, x).eval()
    opt = optimize(m, [x, NO_R], lowering="ipex")
    assert histogram(opt)["onednn.qconv_pointwise"] == 1
    lowered = [d for d in opt.fusepass_report.decisions if d.stage == "lower" and d.action == "lowered"]
    assert any("onednn instead" in d.reason for d in lowered) or not fusepass.lowering.ipex_available()


# ------------------------------------------------------------------ whole models
needs_torchao = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchao") is None,
    reason="torchao not installed (pip install 'fusepass[int8]'; make setup installs it)")
needs_int8_kernels = pytest.mark.skipif(
    not hasattr(torch.ops.onednn, "qconv_pointwise"),
    reason=f"torch {torch.__version__} lacks onednn.qconv_pointwise (the int8 kernels)")
def rel(a, b):
    return float((a - b).norm() / b.norm())


def model_check(model, inputs, calib, expect_int8, **quant_kw):
    """fusepass.quantize, then torch.compile(backend="fusepass"): every expected layer on an
    int8 kernel; the error against the converted model no larger than that model's own
    sensitivity to fp32 rounding (the same converted model fed channels-last, or its
    inputs perturbed by one ulp), and against fp32 no larger than the converted model's."""
    qm = fusepass.quantize(model, calib, **quant_kw)
    with torch.no_grad():
        ref, fp32 = qm(*inputs), model(*inputs)
        ref, fp32 = [torch.utils._pytree.tree_leaves(t)[0] for t in (ref, fp32)]
        assert fp32.abs().max() > 1e-3, "the model's output is ~0: a vacuous comparison"
        opt = fusepass.optimize(qm, list(inputs))
        got = torch.utils._pytree.tree_leaves(opt(*inputs))[0]
        compiled = torch.utils._pytree.tree_leaves(torch.compile(qm, backend="fusepass")(*inputs))[0]
        # the converted model's own sensitivity to fp32 rounding: fed channels-last (another
        # summation order), a quantized value on a rounding boundary flips and the flip grows
        # layer by layer (measured on these random-weight nets: ~3 % after 20 layers)
        cl = [i.contiguous(memory_format=torch.channels_last) if i.dim() == 4 else i * (1 + EPS)
              if i.is_floating_point() else i for i in inputs]
        noise = rel(torch.utils._pytree.tree_leaves(qm(*cl))[0], ref)
    h = histogram(opt)
    kernels = {k: v for k, v in h.items() if k.startswith("onednn.q")}
    assert sum(kernels.values()) == expect_int8, (kernels, h)
    budget = max(2 * noise, 2e-3)
    assert rel(got, ref) <= budget and rel(compiled, ref) <= budget, (rel(got, ref), noise)
    assert rel(got, fp32) <= 1.5 * rel(ref, fp32) + 2 * budget
    return qm, opt


@needs_torchao
@needs_int8_kernels
def test_resnet_style_net_all_convs_int8():
    from bench import zoo
    m = zoo.build("resnet18")
    x = zoo.example_input("resnet18", 2, 64)
    calib = [zoo.example_input("resnet18", 2, 64, seed=i) for i in range(2)]
    qm, opt = model_check(m, [x], calib, expect_int8=21)  # 20 convs + fc
    assert histogram(opt)["onednn.qconv2d_pointwise.binary"] == 8  # every residual add
    layers = qm.fusepass_quantization.layers
    assert set(layers.values()) == {"int8"} and len(layers) == 21


@needs_torchao
@needs_int8_kernels
def test_mobilenet_v3_style_net():
    """hardswish, depthwise convs, squeeze-excite (its hardsigmoid has no int8 conv
    post-op: that conv runs int8 with the gate after it)."""
    from bench import zoo
    m = zoo.build("mobilenet_v3_small")
    x = zoo.example_input("mobilenet_v3_small", 1, 64)
    n_layers = sum(isinstance(t, (nn.Conv2d, nn.Linear)) for t in m.modules())
    qm = fusepass.quantize(m, [x])
    with torch.no_grad():
        opt = fusepass.optimize(qm, [x])
        ref, got = qm(x), opt(x)
        noise = rel(qm(x.contiguous(memory_format=torch.channels_last)), ref)
    h = histogram(opt)
    n_int8 = sum(v for k, v in h.items() if k.startswith("onednn.q"))
    assert n_int8 == n_layers, (n_int8, n_layers, h)
    assert rel(got, ref) <= max(2 * noise, 2e-3), (rel(got, ref), noise)


@needs_torchao
@needs_int8_kernels
def test_bert_style_encoder_static():
    from tests.util import tiny_bert
    bert = tiny_bert(2)
    ids = torch.randint(0, 100, (2, 16))
    calib = [torch.randint(0, 100, (2, 16)) for _ in range(2)]
    n_linear = sum(isinstance(t, nn.Linear) for t in bert.modules())
    model_check(bert, [ids], calib, expect_int8=n_linear)


@needs_torchao
def test_quantize_max_error_returns_sensitive_layers_to_fp32():
    from bench import zoo
    m = zoo.build("resnet18")
    calib = [zoo.example_input("resnet18", 1, 32, seed=i) for i in range(2)]
    qm = fusepass.quantize(m, calib)
    full = qm.fusepass_quantization.error
    q2 = fusepass.quantize(m, calib, max_error=full * 0.6)
    rep = q2.fusepass_quantization
    fp32 = [n for n, p in rep.layers.items() if p != "int8"]
    assert fp32 and all("most sensitive" in rep.layers[n] for n in fp32)
    assert rep.error <= full * 0.6
    # the measured error is the real one
    from fusepass.quantization import relative_error
    with torch.no_grad():
        refs = [m(c).reshape(-1) for c in calib]
    assert abs(relative_error(q2, refs, calib) - rep.error) < 1e-6


@needs_torchao
def test_quantize_restores_inductors_pre_grad_pass():
    import torch._inductor.config as cfg
    before = cfg.pre_grad_custom_pass
    from bench import zoo
    fusepass.quantize(zoo.build("resnet18"), [zoo.example_input("resnet18", 1, 32)])
    assert cfg.pre_grad_custom_pass is before


@needs_torchao
def test_quantize_bad_arguments():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="per_channel"):
        fusepass.quantize(lin, [torch.randn(2, 4)], per_channel=False)
    with pytest.raises(ValueError, match="calibration"):
        fusepass.quantize(lin, [])
    with pytest.raises(ValueError, match="max_error"):
        fusepass.quantize(lin, [torch.randn(2, 4)], max_error=-1)


@needs_torchao
def test_bert_dynamic_quantization_runs_int8():
    """Dynamic (per-call) activation quantization: every linear of the encoder becomes an
    int8 kernel with per-call qparams; outputs as the converted graph's."""
    from tests.util import tiny_bert
    bert = tiny_bert(1)
    ids = torch.randint(0, 100, (2, 16))
    qm = fusepass.quantize(bert, [ids], dynamic=True)
    with torch.no_grad():
        opt = fusepass.optimize(qm, [ids])
        ref, got = qm(ids), opt(ids)
    ref, got = [torch.utils._pytree.tree_leaves(t)[0] for t in (ref, got)]
    assert rel(got, ref) < 1e-3
    n_linear = sum(isinstance(t, nn.Linear) for t in bert.modules())
    h = histogram(opt)
    assert sum(v for k, v in h.items() if k.startswith("onednn.qlinear_pointwise.")
               and k.endswith("tensor")) == n_linear, h
    assert not [d for d in opt.fusepass_report.decisions
                if d.rule.startswith("int8.") and d.action == "declined"
                and "no int8 row takes it" in d.reason]


PASSTHROUGH = {"max_pool2d": lambda y: F.max_pool2d(y, 3, 2, 1), "view": lambda y: y.flatten(1),
               "permute": lambda y: y.permute(0, 2, 3, 1)}


@pytest.mark.parametrize("row", sorted(PASSTHROUGH))
@settings(max_examples=examples(4))
@given(hi=st.sampled_from([127, 255]), zp=st.integers(0, 20), batch=st.sampled_from([1, 3]))
def test_int8_passthrough_rows(row, hi, zp, batch):
    """quantize(op(dequantize(x))) with shared parameters runs op on the int8 tensor:
    exactly the same values, no dequantize/quantize left around it."""
    fn = PASSTHROUGH[row]

    class M(nn.Module):
        def forward(self, x):
            y = fn(dq(q(x, 0.05, zp, hi), 0.05, zp, hi))
            return dq(q(y, 0.05, zp, hi), 0.05, zp, hi)
    # max pooling channels-last with C*H*W > 255 (ATen's own u8 max_pool2d raises there);
    # a view of a channels-last tensor is a copy (reshape), not a view: contiguous
    fmt = torch.channels_last if row == "max_pool2d" else torch.contiguous_format
    m, x = M(), torch.randn(batch, 8, 9, 9).contiguous(memory_format=fmt)
    opt = optimize(m, [x])
    assert actions(opt, f"int8.{row}")[0][0] == "rewritten"
    h = histogram(opt)
    assert quantize_ops(opt) == 1 and quantize_ops(opt, "dequantize_per_tensor") == 1, h
    with torch.no_grad():
        assert torch.equal(opt(x), m(x))


def test_passthrough_declines_other_qparams():
    class M(nn.Module):
        def forward(self, x):
            y = F.max_pool2d(dq(q(x, 0.05, 0, 127), 0.05, 0, 127), 2)
            return dq(q(y, 0.07, 0, 127), 0.07, 0, 127)
    m, x = M(), torch.randn(1, 4, 8, 8)
    opt = optimize(m, [x])
    (action, reason), = actions(opt, "int8.max_pool2d")
    assert action == "declined" and "differ" in reason
    with torch.no_grad():
        assert torch.equal(opt(x), m(x))


# ------------------------------------------------------------------ int8 cat and average pooling
from fusepass.patterns import TABLE  # noqa: E402
from fusepass.patterns.quantized_passthrough import MAX_WINDOW  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class QSandwich(nn.Module):
    """quantize(fn(dequantize(q_i(x_i)))) -> dequantize, each input quantized with its own
    parameters ``ins[i]`` and the output with ``out`` ((scale, zero point, hi) u8): what
    convert_pt2e makes of a cat or pooling between quantized layers."""

    def __init__(self, fn, ins, out):
        super().__init__()
        self.fn, self.ins, self.out = fn, ins, out

    def forward(self, *xs):
        ds = [dq(q(x, *p), *p) for x, p in zip(xs, self.ins)]
        return dq(q(self.fn(*ds), *self.out), *self.out)


def check_exact(m, xs, rule, action="rewritten"):
    """The row's decision; outputs equal to the q/dq graph's bit for bit with eager's
    strides, on the onednn and the reference lowering."""
    g = torch.fx.Graph()  # traced by hand: fx's tracer takes no ``*xs`` forward
    tracer = torch.fx.proxy.GraphAppendingTracer(g)
    g.output(m(*(torch.fx.Proxy(g.placeholder(f"x{i}"), tracer) for i in range(len(xs)))).node)
    gm = torch.fx.GraphModule(m, g)
    with torch.no_grad():
        opt = fusepass.optimize(gm, list(xs))
        ref = fusepass.optimize(gm, list(xs), lowering="reference")
    assert [a for a, _ in actions(opt, rule)] == [action], actions(opt, rule)
    for o in (opt, ref):
        with torch.no_grad():
            want, got = m(*xs), o(*xs)
        assert torch.equal(got, want), float((got - want).abs().max())
        assert got.stride() == want.stride(), (got.stride(), want.stride())
    return opt


CAT_ROWS = TABLE.select("int8.cat")


def test_cat_rows_cover_every_count():
    assert [r.name for r in CAT_ROWS] == [f"int8.cat{n}" for n in range(2, len(CAT_ROWS) + 2)]


@pytest.mark.parametrize("rule", CAT_ROWS, ids=lambda r: r.name)
@settings(max_examples=examples(2))
@given(dim=st.sampled_from([1, 2, -1]), layout=st.sampled_from(sorted(LAYOUTS)),
       hi=st.sampled_from([127, 255]), zp=st.integers(0, 20), batch=st.sampled_from([1, 3]),
       sizes=st.lists(st.integers(1, 4), min_size=32, max_size=32))
def test_int8_cat_rows(rule, dim, layout, hi, zp, batch, sizes):
    """quantize(cat(dequantize(x_i))) with shared parameters: a cat of the u8 tensors, no
    dequantize of an input and no quantize of the output left (only the inputs' own
    quantizes and the final dequantize), values and strides as the graph's."""
    n = int(rule.name.removeprefix("int8.cat"))
    p = (0.05, zp, hi)
    m = QSandwich(lambda *ds: torch.cat(ds, dim), [p] * n, p)
    xs = []
    for i in range(n):
        shape = [batch, 3, 5, 4]
        shape[dim] = sizes[i]
        xs.append(torch.randn(shape).contiguous(memory_format=LAYOUTS[layout]))
    opt = check_exact(m, xs, rule.name)
    h = histogram(opt)
    assert quantize_ops(opt) == n and quantize_ops(opt, "dequantize_per_tensor") == 1, h
    assert h["aten.cat"] == 1, h


@pytest.mark.parametrize("differ", [[1], [0, 2]])
def test_cat_requantizes_inputs_with_other_parameters(differ):
    """An input quantized with other parameters than the output's is requantized to
    them on its own, before the int8 cat: exact (cat only moves values)."""
    out = (0.05, 3, 127)
    ins = [(0.11, 9, 255) if i in differ else out for i in range(3)]
    m = QSandwich(lambda *ds: torch.cat(ds, 1), ins, out)
    xs = [torch.randn(2, c, 6, 6) for c in (3, 4, 5)]
    opt = check_exact(m, xs, "int8.cat3")
    # the inputs' quantizes + one requantize per differing input; its dequantize + the output's
    assert quantize_ops(opt) == 3 + len(differ), histogram(opt)
    assert quantize_ops(opt, "dequantize_per_tensor") == 1 + len(differ), histogram(opt)


def test_cat_declines_when_no_input_shares_the_output_parameters():
    m = QSandwich(lambda a, b: torch.cat([a, b], 1), [(0.11, 9, 255), (0.07, 0, 127)], (0.05, 3, 127))
    xs = [torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)]
    opt = check_exact(m, xs, "int8.cat2", action="declined")
    (_, reason), = actions(opt, "int8.cat2")
    assert "no input's quantize parameters are the output's" in reason, reason
    assert histogram(opt)["aten.cat"] == 1 and quantize_ops(opt) == 3


ODD_WINDOWS = [(1, 1), (1, 3), (3, 3), (3, 5), (5, 5), (7, 7), (11, 11)]


@settings(max_examples=examples(12))
@given(k=st.sampled_from(ODD_WINDOWS), stride=st.sampled_from([1, 2, None]),
       pad=st.sampled_from([0, 1]), layout=st.sampled_from(sorted(LAYOUTS)),
       hi=st.sampled_from([127, 255]), zp=st.integers(0, 64), batch=st.sampled_from([1, 2]))
def test_int8_avg_pool2d_row(k, stride, pad, layout, hi, zp, batch):
    """avg_pool2d over odd windows on the u8 tensor: bit-identical to the q/dq graph
    (``_pool_exact``), padding counted as the zero point; no quantize/dequantize left."""
    pad = [min(pad, k[0] // 2), min(pad, k[1] // 2)]
    p = (0.05, zp, hi)
    m = QSandwich(lambda d: F.avg_pool2d(d, k, stride, pad), [p], p)
    x = torch.randn(batch, 6, 13, 12).contiguous(memory_format=LAYOUTS[layout])
    opt = check_exact(m, [x], "int8.avg_pool2d")
    assert quantize_ops(opt) == 1 and quantize_ops(opt, "dequantize_per_tensor") == 1, histogram(opt)


@settings(max_examples=examples(8))
@given(hw=st.sampled_from([(3, 3), (5, 7), (7, 7), (11, 11)]),
       layout=st.sampled_from(sorted(LAYOUTS)), hi=st.sampled_from([127, 255]),
       zp=st.integers(0, 64), batch=st.sampled_from([1, 3]))
def test_int8_global_pool_row(hw, layout, hi, zp, batch):
    """adaptive_avg_pool2d to 1x1 (captured as mean over H, W; channels-last input: an
    as_strided view after it) of an odd count: an int32 sum of the u8 tensor rounded in
    integers, bit-identical to the graph."""
    p = (0.05, zp, hi)
    m = QSandwich(lambda d: F.adaptive_avg_pool2d(d, 1), [p], p)
    x = torch.randn(batch, 16, *hw).contiguous(memory_format=LAYOUTS[layout])
    restrided = layout == "channels_last"  # capture's as_strided view after the mean
    opt = check_exact(m, [x], "int8.mean" + (".restrided" if restrided else ""))
    h = histogram(opt)
    assert quantize_ops(opt) == 1 and quantize_ops(opt, "dequantize_per_tensor") == 1, h
    assert h["aten.sum"] == 1 and not h["aten.mean"], h


def window_sums(n, hi):
    """One window of ``n`` u8 values per sum 0..n*hi, the values spread as evenly as the
    sum allows, then shuffled within the window: [1, sums, n]."""
    s = torch.arange(n * hi + 1)
    v = (s[:, None] // n + (torch.arange(n)[None, :] < (s % n)[:, None])).to(U8)
    g = torch.Generator().manual_seed(0)
    return v[:, torch.randperm(n, generator=g)][None]


@pytest.mark.parametrize("hw", [(3, 3), (7, 7), (11, 11)])
@pytest.mark.parametrize("s,z", [(0.05, 0), (1 / 3, 7), (0.0041, 64)])
def test_pool_rounding_is_exact_for_every_window_sum(hw, s, z):
    """Exhaustive over the window sums of odd windows up to the proven bound (11x11 =
    MAX_WINDOW): the int8 rows' average equals the graph's for every sum, both rows."""
    assert hw[0] * hw[1] <= MAX_WINDOW
    v = window_sums(hw[0] * hw[1], 255).reshape(1, -1, *hw)  # one window per channel
    p = (s, z, 255)
    x = (v.float() - z) * s  # its quantize gives back exactly v (dequantize's inverse)
    assert torch.equal(q(x, *p), v)
    for fn, rule in ((lambda d: F.adaptive_avg_pool2d(d, 1), "int8.mean"),
                     (lambda d: F.avg_pool2d(d, hw), "int8.avg_pool2d")):
        check_exact(QSandwich(fn, [p], p), [x], rule)


@pytest.mark.parametrize("case,rule,expect", [
    ("2x2", "int8.avg_pool2d", "averages 4 values (even)"),
    ("ceil", "int8.avg_pool2d", "ceil_mode"),
    ("uncounted_pad", "int8.avg_pool2d", "count_include_pad=False"),
    ("global_8x8", "int8.mean", "averages 64 values (even)"),
    ("global_13x13", "int8.mean", "averages 169 values"),
    ("other_qparams", "int8.avg_pool2d", "differ from the dequantize's"),
])
def test_avg_pool_declines_and_stays_exact(case, rule, expect):
    p = (0.05, 5, 127)
    fn, out, shape = {
        "2x2": (lambda d: F.avg_pool2d(d, 2), p, (1, 4, 8, 8)),
        "ceil": (lambda d: F.avg_pool2d(d, 3, 2, ceil_mode=True), p, (1, 4, 8, 8)),
        "uncounted_pad": (lambda d: F.avg_pool2d(d, 3, 1, 1, count_include_pad=False), p, (1, 4, 8, 8)),
        "global_8x8": (lambda d: F.adaptive_avg_pool2d(d, 1), p, (1, 4, 8, 8)),
        "global_13x13": (lambda d: F.adaptive_avg_pool2d(d, 1), p, (1, 4, 13, 13)),
        "other_qparams": (lambda d: F.avg_pool2d(d, 3), (0.07, 5, 127), (1, 4, 9, 9)),
    }[case]
    m = QSandwich(fn, [p], out)
    opt = check_exact(m, [torch.randn(shape)], rule, action="declined")
    (_, reason), = actions(opt, rule)
    assert expect in reason, reason


def test_even_windows_are_declined_for_a_measured_reason():
    """What the decline of even windows rests on: over every 2x2 window sum, the integer
    average (either rounding of ties) differs from the float graph by one step somewhere,
    never by more."""
    v = window_sums(4, 255).reshape(1, -1, 2, 2)
    s, z = 0.0123, 7
    want = q(F.avg_pool2d(dq(v, s, z, 255), 2), s, z, 255).int()
    tot = F.avg_pool2d(v.float(), 2)
    for got in (torch.round(tot), torch.round(tot - z) + z, torch.floor(tot + 0.5)):
        d = (got.int() - want).abs()
        assert int(d.max()) == 1, int(d.max())
