"""The per-layer tools of issue 16 (bench/fp32_layers.py, bench/blocked_kernels.py) name
what they time correctly: a conv's shape class from oneDNN's verbose line and from ORT's
profiled shapes, and the blocked path really runs oneDNN's blocked kernel and computes
eager's conv. Expected shapes are the parameters the test itself chose."""
from __future__ import annotations

import pytest
import torch

from bench import blocked_kernels, fp32_layers


def _conv_rows(x, w, b, stride, pad):
    pw = torch.ops.mkldnn._reorder_convolution_weight(w, [pad] * 2, [stride] * 2, [1, 1], 1, list(x.shape))
    xc = x.contiguous(memory_format=torch.channels_last)
    fn = lambda: torch.ops.mkldnn._convolution_pointwise(  # noqa: E731
        xc, pw, b, [pad] * 2, [stride] * 2, [1, 1], 1, "relu", [], None)
    fn()
    return fp32_layers._onednn_rows(fp32_layers.onednn_verbose(fn, 2), 2)


def test_verbose_rows_name_the_conv_shape_and_layout():
    torch.manual_seed(0)
    rows = _conv_rows(torch.randn(1, 8, 20, 20), torch.randn(16, 8, 3, 3), torch.randn(16), 2, 1)
    convs = [r for r in rows if r["op"] == "3x3/2"]
    assert len(convs) == 1, rows
    assert convs[0]["shape"] == "3x3/2 8->16 @20"
    assert convs[0]["count"] == 1  # once per call, two calls averaged
    assert convs[0]["impl"].endswith("(acdb)")  # channels-last source, as fusepass runs it
    assert convs[0]["ms"] > 0


def test_verbose_rows_class_a_1x1_and_the_stem():
    torch.manual_seed(0)
    one = _conv_rows(torch.randn(1, 32, 14, 14), torch.randn(64, 32, 1, 1), torch.randn(64), 1, 0)
    stem = _conv_rows(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 7, 7), torch.randn(8), 2, 3)
    assert [r["shape"] for r in one if r["op"] == "1x1"] == ["1x1/1 32->64 @14"]
    assert [r["shape"] for r in stem if r["op"] == "stem 7x7/2"] == ["7x7/2 3->8 @32"]


def test_ort_conv_shapes_are_classed_like_onednn_ones():
    # an ORT profile's Conv: input_type_shape [x, w, b], output_type_shape [y]
    assert fp32_layers.ort_conv_key([[1, 64, 56, 56], [256, 64, 1, 1], [256]], [[1, 256, 56, 56]]) == \
        ("1x1", "1x1/1 64->256 @56")
    assert fp32_layers.ort_conv_key([[1, 128, 56, 56], [128, 128, 3, 3], [128]], [[1, 128, 28, 28]]) == \
        ("3x3/2", "3x3/2 128->128 @56")


def test_summary_adds_classes_and_rest():
    side = {"median_ms": 10.0, "cpu_ms": 9.0, "timed_calls": 5, "rows": [
        {"op": "1x1", "shape": "1x1/1 4->8 @7", "impl": "a", "ms": 1.5, "count": 2},
        {"op": "1x1", "shape": "1x1/1 8->4 @7", "impl": "a", "ms": 0.5, "count": 1},
        {"op": "3x3", "shape": "3x3/1 4->4 @7", "impl": "b", "ms": 3.0, "count": 1},
        {"op": "aten::max_pool2d", "shape": "", "impl": "c", "ms": 0.25, "count": 1}]}
    row = next(ln for ln in fp32_layers.summarize({"x": side}) if ln.startswith("| x |"))
    # side | median | cpu | stem | 1x1 | 1x1/2 | 3x3 | 3x3/2 | convs | rest
    assert [c.strip() for c in row.strip("|").split("|")] == \
        ["x", "10.0", "9.0", "0.0", "2.0", "0.0", "3.0", "0.0", "5.0", "0.2"]


@pytest.mark.parametrize("shape", [(3, 1, 16, 16, 14), (1, 2, 16, 32, 14), (7, 2, 3, 8, 32)],
                         ids=lambda s: blocked_kernels.name(*s))
def test_blocked_path_runs_blocked_kernels_and_matches_eager(shape):
    k, s, cin, cout, h = shape
    fns = blocked_kernels.kernels(k, s, cin, cout, h, 1)
    g = torch.Generator().manual_seed(0)  # the inputs kernels() draws, in its order
    x = torch.randn(1, cin, h, h, generator=g)
    w = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    ref = torch.relu(torch.nn.functional.conv2d(x, w, b, s, k // 2))
    yb, yc = fns["blocked"](), fns["cl"]()
    assert yb.is_mkldnn and not yc.is_mkldnn
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb.to_dense(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(yc, ref, rtol=1e-4, atol=1e-4)
    prims = blocked_kernels._prim(fns["blocked"], 1)
    # oneDNN's blocked activations: aBcd8b on AVX2, aBcd16b on AVX-512 (the stem reads
    # the plain input and writes blocked)
    assert prims and all(f.split("(")[1].startswith(("aBcd", "abcd")) for f in prims), prims
    if k != 7:
        assert all("aBcd" in f for f in prims), prims
