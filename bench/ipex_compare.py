"""fusepass(ipex) vs fusepass(onednn) vs IPEX's own two paths vs eager, in the IPEX env.

Why: the ipex lowering target only earns its keep if its kernels beat the onednn target
on the same torch, and it should be compared with what an IPEX user would otherwise do
(``ipex.optimize`` + ``jit.trace`` + ``jit.freeze``, or ``torch.compile(backend="ipex")``).
Everything here runs in one process of the IPEX env (torch 2.8), so all five configs
share torch, oneDNN and threads.

    .venv-ipex/bin/python -m bench.ipex_compare                     # RN50 + BERT, bs 1 and 8
    .venv-ipex/bin/python -m bench.ipex_compare --models resnet50 --batch 1 --rounds 3

Method: each config is built (and compiled by its first calls, timed as "compile") on
its own deep copy of the model; its output is compared with eager's. Then R rounds
interleave the configs (order rotated every round), each timing ~--round-time seconds of
calls; a config's result is the median over rounds of its per-round mean latency.
Results: bench/results/ipex_compare-<stamp>.json and .md (gitignored).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ["fusepass_ipex", "fusepass_onednn", "ipex_jit", "ipex_backend", "eager"]
DESCRIPTION = {
    "fusepass_ipex": 'torch.compile(backend="fusepass", options={"lowering": "ipex"})',
    "fusepass_onednn": 'torch.compile(backend="fusepass", options={"lowering": "onednn"})',
    "ipex_jit": "ipex.optimize(deepcopy(m), sample_input=x) + jit.trace + jit.freeze",
    "ipex_backend": 'ipex.optimize(deepcopy(m), weights_prepack=False) + torch.compile(backend="ipex"), Inductor freezing on',
    "eager": "eager PyTorch (torch.no_grad)",
}


# ----------------------------------------------------------------------------- models

class Encoder(nn.Module):
    """BertModel -> last_hidden_state: one tensor out, so jit.trace takes it as is."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


def reinit_bert_(model: nn.Module, seed: int = 0) -> nn.Module:
    """HF's init (std 0.02 everywhere) shrinks every Linear's output ~2x, leaving near-uniform
    attention and embedding-dominated outputs. Re-init variance-preserving instead:
    Linear N(0, 1/fan_in) (query/key 2x, so softmax is far from uniform), biases N(0, .02),
    LayerNorm weight U(0.8, 1.2) / bias N(0, .05), embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                gain = 2.0 if name.rsplit(".", 1)[-1] in ("query", "key") else 1.0
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return model


def build(name: str, batch: int):
    """(eval model, input) for a model name."""
    if name == "resnet50":
        from bench import zoo as models
        return models.build("resnet50"), models.example_input("resnet50", batch, 224)
    if name == "bert_base":
        from transformers import BertConfig, BertModel
        cfg = BertConfig()  # bert-base: 12 layers, 768 hidden, 12 heads
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        m = Encoder(reinit_bert_(BertModel(cfg, add_pooling_layer=False))).eval()
        ids = torch.randint(0, cfg.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(1))
        return m, ids
    raise ValueError(name)


# ----------------------------------------------------------------------------- configs

def _fusepass(model, x, lowering):
    from fusepass.backend import fusepass_backend
    seen = []

    def backend(gm, example_inputs):
        c = fusepass_backend(gm, example_inputs, options={"lowering": lowering})
        seen.append(c)
        return c

    fn = torch.compile(model, backend=backend)

    def info():
        kernels, fell_back = {}, []
        for c in seen:
            for v in c.variants.values():
                for k, n in v.report.kernels.items():
                    kernels[k] = kernels.get(k, 0) + n
                fell_back += [d.reason for d in v.report.decisions
                              if d.stage == "lower" and (d.action in ("fallback", "kept", "error")
                                                         or d.reason.startswith("ipex: "))]
        return {"graphs": len(seen), "kernels": kernels, "lowering_fallbacks": sorted(set(fell_back))}
    return fn, info


def make(config, model, x):
    """(callable, info()) for a config, on its own copy of the model."""
    m = copy.deepcopy(model).eval()
    if config == "eager":
        return m, dict
    if config == "fusepass_ipex":
        return _fusepass(m, x, "ipex")
    if config == "fusepass_onednn":
        return _fusepass(m, x, "onednn")
    import intel_extension_for_pytorch as ipex
    if config == "ipex_jit":
        m = ipex.optimize(m, dtype=torch.float32, sample_input=(x,))
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(m, (x,), check_trace=False, strict=False))
        return traced, lambda: {"ipex": ipex.__version__}
    if config == "ipex_backend":
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True  # options={"freezing": True} was seen to be ignored
        m = ipex.optimize(m, dtype=torch.float32, weights_prepack=False)
        return torch.compile(m, backend="ipex"), lambda: {"ipex": ipex.__version__}
    raise ValueError(config)


# ----------------------------------------------------------------------------- measuring

def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def rel_err(got, want):
    got, want = first(got).float(), first(want).float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def one_round(fn, x, seconds):
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 2:
            return dt / n * 1e3


def bench_case(name, batch, configs, rounds, round_time, warmup, log):
    model, x = build(name, batch)
    with torch.no_grad():
        want = model(x)
    assert torch.isfinite(first(want)).all() and first(want).float().std() > 1e-3, "degenerate model"
    built, rows = {}, {}
    for c in configs:
        row = rows[c] = {"config": c, "description": DESCRIPTION[c]}
        try:
            t0 = time.perf_counter()
            fn, info = make(c, model, x)
            with torch.no_grad():
                out = fn(x)
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                for _ in range(warmup):
                    out = fn(x)
            row["max_rel_err_vs_eager"] = rel_err(out, want)
            row["info"] = info()
            built[c] = fn
            log(f"  {c:16s} built in {row['compile_s']:.1f}s, rel err {row['max_rel_err_vs_eager']:.2e}")
        except Exception as e:  # a config that fails is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=6)
            log(f"  {c:16s} FAILED: {row['error'][:200]}")
    times = {c: [] for c in built}
    order = list(built)
    with torch.no_grad():
        for r in range(rounds):
            for c in order[r % len(order):] + order[:r % len(order)]:
                times[c].append(one_round(built[c], x, round_time))
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c} {times[c][-1]:.1f}" for c in order))
    eager = statistics.median(times["eager"]) if "eager" in times else None
    for c, ts in times.items():
        med = statistics.median(ts)
        rows[c].update(ms_median=round(med, 3), ms_min=round(min(ts), 3), ms_rounds=[round(t, 3) for t in ts],
                       speedup_vs_eager=round(eager / med, 3) if eager else None)
    del built, model
    return {"model": name, "batch": batch, "rows": list(rows.values())}


# ----------------------------------------------------------------------------- report

def markdown(result) -> str:
    env = result["env"]
    lines = [f"# fusepass(ipex) vs the rest — {result['stamp']}", "",
             f"torch {env['torch']}, IPEX {env.get('ipex')}, {env['threads']} threads, "
             f"{env['cpu_capability']}; {result['settings']['rounds']} interleaved rounds of "
             f"~{result['settings']['round_time']} s; fp32, no_grad; load average "
             f"{env['loadavg_start'][0]:.1f} at start, {env.get('loadavg_end', [float('nan')])[0]:.1f} at end.", "",
             "| model | bs | " + " | ".join(CONFIGS) + " |",
             "|---|---|" + "---|" * len(CONFIGS)]
    for case in result["cases"]:
        by = {r["config"]: r for r in case["rows"]}
        cells = []
        for c in CONFIGS:
            r = by.get(c)
            if r is None:
                cells.append("–")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['ms_median']:.1f} / {r['ms_min']:.1f} ms ({r['speedup_vs_eager']:.2f}x)")
        lines.append(f"| {case['model']} | {case['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: median / min over rounds of the per-round mean latency; speedup (of the "
              "medians) vs eager in parentheses. On a loaded machine the min is the steadier "
              "number.", "", "Compile time (s) and max relative error vs eager:", "",
              "| model | bs | " + " | ".join(CONFIGS) + " |", "|---|---|" + "---|" * len(CONFIGS)]
    for case in result["cases"]:
        by = {r["config"]: r for r in case["rows"]}
        cells = [("–" if c not in by else "error" if "error" in by[c] else
                  f"{by[c]['compile_s']:.1f} s / {by[c]['max_rel_err_vs_eager']:.1e}") for c in CONFIGS]
        lines.append(f"| {case['model']} | {case['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Configs:", ""] + [f"- `{c}`: {DESCRIPTION[c]}" for c in CONFIGS]
    errors = [(case["model"], case["batch"], r["config"], r["error"]) for case in result["cases"]
              for r in case["rows"] if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {m} bs{b} {c}: {e[:300]}" for m, b, c, e in errors]
    lines += ["", "fusepass kernels (per compiled model):", ""]
    for case in result["cases"]:
        for r in case["rows"]:
            if r["config"].startswith("fusepass") and "info" in r:
                k = ", ".join(f"{n} x{v}" for n, v in sorted(r["info"]["kernels"].items()))
                lines.append(f"- {case['model']} bs{case['batch']} {r['config']}: {k}")
                for reason in r["info"]["lowering_fallbacks"][:6]:
                    lines.append(f"  - {reason}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,bert_base")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-time", type=float, default=1.5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    configs = [c for c in a.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    try:
        import intel_extension_for_pytorch as ipex
        ipex_version = ipex.__version__
    except ImportError:
        p.error("intel_extension_for_pytorch is not importable: run this in the IPEX env "
                "(make ipex-env; .venv-ipex/bin/python -m bench.ipex_compare)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {
        "stamp": stamp,
        "env": {"torch": torch.__version__, "ipex": ipex_version, "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "python": platform.python_version(), "machine": platform.machine(),
                "loadavg_start": os.getloadavg()},
        "settings": {"rounds": a.rounds, "round_time": a.round_time, "warmup": a.warmup,
                     "configs": configs},
        "cases": [],
    }

    def log(msg):
        print(msg, flush=True)

    for name in a.models.split(","):
        for batch in (int(b) for b in a.batch.split(",")):
            log(f"{name} bs{batch}")
            torch._dynamo.reset()
            result["cases"].append(bench_case(name, batch, configs, a.rounds, a.round_time,
                                              a.warmup, log))
    result["env"]["loadavg_end"] = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"ipex_compare-{stamp}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (a.out / f"ipex_compare-{stamp}.md").write_text(md)
    print(md)
    print(f"wrote {a.out}/ipex_compare-{stamp}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
