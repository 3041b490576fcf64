"""The package's ResNets end to end: every residual add fused with its ReLU into the
conv before it, every conv lowered to a fused oneDNN kernel, outputs equal to eager.

ResNet-50 has 53 convs: the stem, 3 per bottleneck (16 bottlenecks) and 4 downsample
convs. After BN folding: stem and the first two convs of each block take a ReLU (33),
the third takes the residual add and the block's ReLU (16: ``conv2d.add`` then
``conv2d.relu`` on the fused op), the downsample convs take nothing (4: their output is
the residual).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bench import zoo as models
from tests.util import NATIVE_BF16, assert_close, histogram, needs_native_bf16, optimize

CONV_KERNELS = ("mkldnn._convolution_pointwise", "mkldnn._convolution_pointwise.binary",
                "mkldnn._convolution_pointwise_.binary")
# model: (convs, residual adds, downsample convs)
NETS = {"resnet50": (53, 16, 4), "resnet18": (20, 8, 3)}
RES = 64  # fully convolutional + adaptive pooling: 64x64 keeps the test quick


def fold_bn_in_eager(model):
    """conv -> BN pairs folded by torch's own helper: ResNet without fold_batchnorm."""
    for mod in model.modules():
        names = list(mod._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                mod._modules[a], mod._modules[b] = fuse_conv_bn_eval(conv, bn), torch.nn.Identity()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return model


def fused_counts(report):
    out = {}
    for d in report.decisions:
        if d.stage == "fuse" and d.action == "rewritten":
            out[d.rule] = out.get(d.rule, 0) + 1
    return out


def check_structure(name, gm, report):
    convs, adds, downsample = NETS[name]
    assert not report.fell_back, report.summary()
    # every conv but the downsample ones takes a ReLU: alone, or after the residual add
    assert fused_counts(report) == {"conv2d.add": adds, "conv2d.relu": convs - downsample}, \
        report.summary()
    lowered = [d for d in report.where(stage="lower", action="lowered") if d.rule in CONV_KERNELS]
    assert len(lowered) == convs, report.summary()  # every conv on a oneDNN kernel
    binary = [d for d in lowered if d.rule.endswith(".binary")]
    assert len(binary) == adds and all(d.reason.startswith("add+relu") for d in binary)
    h = histogram(gm)
    for op in ("aten.add", "aten.relu", "aten._native_batch_norm_legit_no_training",
               "aten.convolution", "fusepass.conv"):
        assert h[op] == 0, (op, h)
    assert sum(h[k] for k in CONV_KERNELS) == convs
    return binary


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_resnet_with_bn_folded_in_eager(name):
    """Independent of fold_batchnorm: the residual fusion alone."""
    m = fold_bn_in_eager(models.build(name))
    x = models.example_input(name, 2, RES)
    gm = optimize(m, [x])
    binary = check_structure(name, gm, gm.fusepass_report)
    # each residual is dead after its add (the next block's first conv read it before)
    assert all(d.rule == "mkldnn._convolution_pointwise_.binary" for d in binary), binary
    with torch.no_grad():
        assert_close(gm(x), m(x))


def test_resnet50_as_built_all_residuals_and_convs_fused():
    """The package's ResNet-50 with its BatchNorms: fold_batchnorm, then the fusion."""
    m = models.build("resnet50")
    x = models.example_input("resnet50", 2, RES)
    gm = optimize(m, [x])
    check_structure("resnet50", gm, gm.fusepass_report)
    with torch.no_grad():
        assert_close(gm(x), m(x))


@needs_native_bf16
def test_resnet18_bf16_channels_last():
    m = fold_bn_in_eager(models.build("resnet18")).to(torch.bfloat16)
    x = models.example_input("resnet18", 2, RES).to(torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    gm = optimize(m, [x])
    binary = check_structure("resnet18", gm, gm.fusepass_report)
    assert all(d.rule == "mkldnn._convolution_pointwise_.binary" for d in binary), binary
    with torch.no_grad():
        got, want = gm(x), m(x)
    # 20 bf16 convs deep: compare against the output's scale, with bf16's tolerance
    assert_close(got, want, torch.bfloat16)


@pytest.mark.skipif(NATIVE_BF16, reason="CPU has native bf16: the fused bf16 path is tested instead")
def test_resnet18_bf16_without_native_bf16_declines_before_lowering():
    """On a CPU without native bf16 (AVX2-only), oneDNN's bf16 kernels raise: nothing is
    fused or lowered to them, every conv says why, and the graph runs (no error, no
    fallback: a decision made before lowering, not an exception)."""
    m = fold_bn_in_eager(models.build("resnet18")).to(torch.bfloat16)
    x = models.example_input("resnet18", 2, RES).to(torch.bfloat16).to(memory_format=torch.channels_last)
    gm = optimize(m, [x])
    rep = gm.fusepass_report
    assert rep.counts == {} and rep.kernels == {}, rep
    lower = rep.where(stage="lower", action="declined")
    assert len(lower) == NETS["resnet18"][0] + 1  # 20 convs and the fc
    assert all("CPU lacks native bf16" in d.reason for d in lower), lower
    assert not rep.where(action="error") and not rep.fell_back, rep
    with torch.no_grad():
        assert_close(gm(x), m(x), torch.bfloat16)
