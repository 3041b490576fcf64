"""CI smoke run of the benchmark harness (bench/): ``python -m bench --smoke`` in a
subprocess (tiny model, batch 1, 2 iterations) must write well-formed JSON and markdown.
It checks the harness's plumbing (worker processes, pipes, report), never a timing.

The opt-in test also runs Inductor with freezing and checks the harness saw freezing
really happen (pytorch#125474); Inductor's cold compile makes it too slow for every CI
run: ``BENCH_SMOKE_INDUCTOR=1 pytest tests/test_bench_smoke.py``.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIRED = {"model", "batch", "config", "status"}
OK_FIELDS = {"latency_ms", "compile_s", "peak_rss_mb", "max_abs_err", "max_rel_err", "samples_ms"}


def run_smoke(out: pathlib.Path, *extra: str, env_extra=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-progress", "--ipex-python", "none",
         "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def bf16_rel_tol() -> float:
    """bf16's bound on the tiny net, relative to the output's scale: 8 significant bits,
    3 roundings per conv/linear layer (input, weight, output), summed over the layers,
    with a factor 2 of margin (the same bound as the config tests below)."""
    import torch
    from bench.models import MODELS
    m = MODELS["tiny"].build(0, "sdpa")
    layers = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    return 2 * 3 * layers * 2.0 ** -8


def check_well_formed(data: dict, out: pathlib.Path, configs: list, rel_tol=None):
    """``rel_tol``: per-config relative error bound where it is not fp32's 1e-4."""
    rel_tol = rel_tol or {}
    assert {"started", "finished", "machine", "envs", "settings"} <= set(data["meta"])
    rows = {r["config"]: r for r in data["results"]}
    assert set(rows) == set(configs)
    for name, r in rows.items():
        assert REQUIRED <= set(r), r
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
        assert OK_FIELDS <= set(r), (name, sorted(r))
        assert r["model"] == "tiny" and r["batch"] == 1
        lat = r["latency_ms"]
        assert lat["n"] == len(r["samples_ms"]) == 2
        assert 0 < lat["min"] <= lat["median"] and lat["q1"] <= lat["median"] <= lat["q3"]
        assert r["peak_rss_mb"] > 0 and r["compile_s"] > 0
        assert math.isfinite(r["max_abs_err"])
        assert r["max_rel_err"] < rel_tol.get(name, 1e-4), (name, r["max_rel_err"])
    assert rows["eager"]["max_abs_err"] == 0.0

    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model | bs | config"))
    ncols = header.count("|")
    table = [line for line in md.splitlines()
             if line.startswith("| tiny | 1 |")]
    assert len(table) >= len(configs)
    for line in table[:len(configs)]:  # the results table: one row per config, all columns
        assert line.count("|") - line.count("\\|") == ncols, line
    return rows


def test_bench_smoke(tmp_path):
    data = run_smoke(tmp_path)
    rows = check_well_formed(data, tmp_path, ["eager", "eager_cl", "fusepass", "dynamo_only"])
    fp = rows["fusepass"]["fusepass"]
    assert "error" not in fp, fp
    assert sum(fp["counts"].values()) > 0, "fusepass.explain reported no rewrite on TinyNet"
    assert rows["eager"]["gflop"] > 0 and rows["dynamo_only"]["max_abs_err"] == 0.0
    md = (tmp_path / "results.md").read_text()
    ceiling = md[md.index("## What the machine and Dynamo allow"):]
    assert "| tiny | 1 |" in ceiling and "no peak measured" in ceiling  # --smoke skips the peak


def test_ceiling_counts_flops_and_measures_a_peak():
    """The arithmetic of one conv + linear by hand (2 flops a multiply-add), and a peak
    that is the best of the two measured kernels."""
    import torch
    from bench.ceiling import model_gflop, peak_gflops
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 10 * 10, 5))
    x = torch.randn(2, 3, 10, 10)
    want = 2 * (2 * 8 * 10 * 10 * 3 * 3 * 3) + 2 * (2 * 800 * 5)
    assert abs(model_gflop(m, (x,)) * 1e9 - want) < 1
    peak = peak_gflops(threads=1)
    assert peak["sgemm_gflops"] > 1 and peak["conv_gflops"] > 1
    assert peak["peak_gflops"] == max(peak["sgemm_gflops"], peak["conv_gflops"])


def test_bench_survives_failing_configs(tmp_path):
    """A config that raises and a worker that dies become error rows; the rest is measured."""
    data = run_smoke(tmp_path, "--configs", "eager,eager_cl,fusepass",
                     env_extra={"BENCH_INJECT_FAULT": "eager_cl:exit,fusepass:raise"})
    rows = {r["config"]: r for r in data["results"]}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["latency_ms"]["n"] == 2
    assert rows["eager_cl"]["status"] == "error" and "exit code 3" in rows["eager_cl"]["error"]
    assert rows["fusepass"]["status"] == "error" and rows["fusepass"]["stage"] == "compile"
    assert "fault injected" in rows["fusepass"]["error"]
    md = (tmp_path / "results.md").read_text()
    assert "## Errors" in md and "fault injected" in md


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BENCH_SMOKE_INDUCTOR") != "1",
                    reason="cold Inductor compile is slow; set BENCH_SMOKE_INDUCTOR=1")
def test_bench_smoke_inductor_freezing(tmp_path):
    data = run_smoke(tmp_path, "--configs", "eager,inductor,inductor_freezing")
    rows = check_well_formed(data, tmp_path, ["eager", "inductor", "inductor_freezing"])
    frz, plain = rows["inductor_freezing"]["info"], rows["inductor"]["info"]
    assert frz["freezing_ran"] and frz["frozen_constants"] > 0 and frz["freezing_verified"]
    assert not plain["freezing_ran"] and plain["freezing_verified"]


# The peers (bench/configs.py): OpenVINO and ONNX Runtime are in the bench extra that
# `make test` installs, so these run (a missing peer fails here instead of skipping: the
# harness's own "not installed" path is tested below without uninstalling anything).
PEERS = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


@pytest.mark.parametrize("config", sorted(PEERS))
def test_bench_smoke_peer(tmp_path, config):
    """The peer compiles TinyNet in its own worker, its output matches eager's (the
    harness's error check: rel err < 1e-4) and it reports its runtime's settings."""
    from bench.configs import CONFIGS
    from bench.models import MODELS
    missing = CONFIGS[config].applies(MODELS["tiny"])
    if missing:  # the IPEX env installs no peers; the main env's bench extra has them
        pytest.skip(missing)
    data = run_smoke(tmp_path, "--configs", f"eager,{config}")
    rows = check_well_formed(data, tmp_path, ["eager", config])
    info = rows[config]["info"]
    assert info[PEERS[config]], info  # the runtime's version
    if config == "openvino":
        assert info["ov_threads"] == 2 and "f32" in info["ov_precision"], info
    else:
        assert info["providers"] == ["CPUExecutionProvider"] and info["ort_threads"] == 2, info
    assert data["meta"]["envs"]["main"][PEERS[config]]
    machine = data["meta"]["machine"]
    assert isinstance(machine["isa_flags"], list) and machine["cpu_family_model"]


def test_peer_outputs_are_converted_back_like_the_model_returns_them():
    """A model with two outputs and two inputs (one int64, as BERT's token ids) through
    ONNX Runtime: a tuple of torch tensors in eager's order, equal to eager's."""
    import torch
    from bench.configs import CONFIGS
    from bench.models import MODELS
    missing = CONFIGS["onnxruntime"].applies(MODELS["tiny"])
    if missing:  # the IPEX env installs no peers
        pytest.skip(missing)

    class TwoInTwoOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4)

        def forward(self, ids, x):
            h = self.emb(ids) + x
            return self.lin(h), h.sum(-1)

    torch.manual_seed(0)
    m = TwoInTwoOut().eval()
    inputs = (torch.randint(0, 50, (2, 5)), torch.randn(2, 5, 8))
    with torch.no_grad():
        want = m(*inputs)
        for name in PEERS:
            fn, _ = CONFIGS[name].make(m, inputs)
            got = fn(*inputs)
            assert isinstance(got, tuple) and len(got) == 2, (name, type(got))
            for g, w in zip(got, want):
                assert isinstance(g, torch.Tensor) and g.shape == w.shape and g.dtype == w.dtype
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_missing_peer_is_a_skipped_row_with_the_install_command():
    from bench.configs import CONFIGS, _peer_missing
    from bench.models import MODELS
    why = _peer_missing("surely_not_an_installed_module_xyz")
    assert "surely_not_an_installed_module_xyz not installed: pip install" in why
    assert "torch==2.13.0" in why


IPEX_ENV = __import__("importlib").util.find_spec("intel_extension_for_pytorch") is not None


@pytest.mark.skipif(IPEX_ENV, reason="the IPEX env installs no peers (the main env's bench extra does)")
def test_the_bench_extra_installs_every_peer():
    from bench.configs import CONFIGS
    from bench.models import MODELS
    for name in ("openvino", "onnxruntime", "openvino_torch_compile", "openvino_int8",
                 "fusepass_int8", "inductor_int8"):
        assert CONFIGS[name].applies(MODELS["tiny"]) is None, name


def test_bf16_rows_are_skip_rows_on_a_cpu_without_native_bf16(tmp_path):
    """The bf16 rows (issue 18) on the smoke net: where the CPU lacks native bf16 the
    table says so instead of a number, and no worker starts for them; where it has it,
    the fusepass row runs (Inductor's is left to the opt-in smoke: its cold compile)."""
    import torch
    from bench.configs import BF16_CONFIGS, CONFIGS, DEFAULT_CONFIGS
    from bench.models import MODELS
    assert set(BF16_CONFIGS) <= set(DEFAULT_CONFIGS)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert all(CONFIGS[c].applies(MODELS["tiny"]) is None for c in BF16_CONFIGS[:2])
        rows = check_well_formed(run_smoke(tmp_path, "--configs", "eager,fusepass_bf16"),
                                 tmp_path, ["eager", "fusepass_bf16"],
                                 rel_tol={"fusepass_bf16": bf16_rel_tol()})
        # bf16 really ran: an error of fp32's size would mean the option changed nothing
        assert rows["fusepass_bf16"]["max_rel_err"] > 1e-5, rows["fusepass_bf16"]
        return
    data = run_smoke(tmp_path, "--configs", ",".join(["eager"] + BF16_CONFIGS))
    rows = {r["config"]: r for r in data["results"]}
    assert rows["eager"]["status"] == "ok"
    for c in BF16_CONFIGS:
        assert rows[c]["status"] == "skipped", rows[c]
        assert rows[c]["reason"].startswith("CPU lacks native bf16"), rows[c]
        assert "latency_ms" not in rows[c]
    md = (tmp_path / "results.md").read_text()
    for c in BF16_CONFIGS:
        line = next(line for line in md.splitlines() if line.startswith(f"| tiny | 1 | {c} "))
        assert "CPU lacks native bf16" in line, line


@pytest.mark.parametrize("name", ["fusepass_bf16", "openvino_bf16"])
def test_bf16_configs_build_and_run_on_the_tiny_net(name):
    """The plumbing of the fusepass and OpenVINO bf16 rows, outside the harness, on every
    CPU (Inductor's is left out: its cold compile). Without native bf16 fusepass keeps
    fp32 and OpenVINO's CPU plugin reports f32; with it, bf16 within bf16's error (8
    significant bits, 3 roundings per conv/linear layer, summed over the layers). The
    OpenVINO row needs the peer (the IPEX env has none; the main env must have it:
    ``test_the_bench_extra_installs_every_peer``)."""
    import torch
    if name == "openvino_bf16":
        pytest.importorskip("openvino")
    from bench.configs import CONFIGS
    from bench.models import MODELS
    spec = MODELS["tiny"]
    m, inputs = spec.build(0, "sdpa").eval(), spec.inputs(1, 0)
    layers = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tol = 2 * 3 * layers * 2.0 ** -8 if native else 1e-5
    with torch.no_grad():
        want = m(*inputs)
        fn, info = CONFIGS[name].make(m, inputs)
        got = fn(*inputs)
        info = info() if callable(info) else info
    err = (got.float() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), (name, err)
    if name == "openvino_bf16" and not native:
        assert info["ov_precision"] == "f32", info
