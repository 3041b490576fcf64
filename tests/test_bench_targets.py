"""bench/targets.py judges issues #15, #16 and #18's targets from one run's rows: the
ratios, the fastest peer, the VNNI-dependent ResNet-50 goal and the marks, on rows whose
answers are worked out by hand here (no timing is measured)."""
from __future__ import annotations

from bench import report, targets


def row(model, bs, config, ms, rss=1000.0, err=1e-6, compile_s=10.0, **info):
    return {"model": model, "batch": bs, "config": config, "status": "ok", "kind": "cnn",
            "latency_ms": {"median": ms}, "peak_rss_mb": rss, "max_rel_err": err,
            "compile_s": compile_s, "info": info}


def render(rows, flags=()):
    return "\n".join(targets.sections(rows, report._index(rows), {"isa_flags": list(flags)}))


def line(md, start):
    return next(x for x in md.splitlines() if x.startswith(start))


def test_fp32_peers_pick_the_fastest_peer_per_row():
    rows = [row("resnet50", 1, "eager", 150), row("resnet50", 1, "fusepass", 57, backend_s=0.5),
            row("resnet50", 1, "inductor_freezing", 60, compile_s=10),
            row("resnet50", 1, "openvino", 50, rss=500), row("resnet50", 1, "onnxruntime", 70)]
    md = render(rows)
    r = line(md, "| resnet50 | 1 |")
    # fastest is openvino (50): 57 / 50 = 1.14, above 0.95; RSS 1000 / 500 = 2
    assert "| openvino | 1.14× ❌ | 2.00× ❌ |" in r
    assert "2.63× ✅" in r  # 150 / 57 over eager
    assert "0.050× ✅" in r  # backend 0.5 s over Inductor-freezing's 10 s compile
    assert "geomean **1.14×** (target ≤ 0.9) ❌" in md


def test_fp32_peers_section_needs_the_peer_rows():
    rows = [row("resnet50", 1, "fusepass", 57), row("resnet50", 1, "inductor_freezing", 60)]
    assert "issue #16" not in render(rows)


def test_bf16_targets():
    rows = [row("bert_base", 8, "fusepass", 900), row("bert_base", 8, "fusepass_bf16", 450, err=1e-2),
            row("bert_base", 8, "inductor_bf16", 600, err=2e-2),
            row("bert_base", 8, "openvino_bf16", 400, ov_precision="bf16")]
    md = render(rows)
    r = line(md, "| bert_base | 8 |")
    assert "| 0.75× ✅ | 1.12× ❌ | 2.00× ✅ | 1.0e-02 / 2.0e-02 ✅ |" in r
    assert "(bf16)" in r


def test_bf16_skip_rows_say_why():
    rows = [{"model": "resnet50", "batch": 1, "config": "fusepass_bf16", "status": "skipped",
             "reason": "CPU lacks native bf16 (x)"}]
    assert "resnet50 bs1: CPU lacks native bf16 (x)" in render(rows)


def test_int8_resnet_goal_follows_vnni():
    rows = [row("resnet50", 1, "fusepass", 60), row("resnet50", 1, "fusepass_int8", 30,
                                                    compile_s=12, quantize_s=8, err_vs_converted=0.01),
            row("resnet50", 1, "inductor_int8", 32, compile_s=28, quantize_s=8, err_vs_converted=0.02),
            row("resnet50", 1, "openvino_int8", 40)]
    # 60 / 30 = 2.0: meets the no-VNNI goal (1.8), misses the VNNI one (2.5)
    assert "| 2.00× ✅ |" in line(render(rows), "| resnet50 | 1 |")
    with_vnni = render(rows, flags=["avx2", "avx512_vnni"])
    assert "| 2.00× ❌ |" in line(with_vnni, "| resnet50 | 1 |")
    assert "≥ 2.5×" in with_vnni
    r = line(with_vnni, "| resnet50 | 1 |")
    # 30 / 32 = 0.94 (≤ 1.0 per row), 30 / 40 = 0.75; compile 12 / 28 = 0.43, without the
    # quantization 4 / 20 = 0.20
    assert "| 0.94× ✅ | 0.75× ✅ |" in r
    assert "0.43× ❌; w/o quantize 0.20× ✅" in r
    assert "0.01 / 0.02 ✅" in r
    assert "geomean **0.94×** (target ≤ 0.9) ❌; worst 0.94× (target ≤ 1.0) ✅" in with_vnni
