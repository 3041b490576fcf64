"""Turns the results into ``results.json``, ``results.md`` and ``latency.png``.

Why separate from the runner: the same rendering serves a finished run, a partial one
(written after every model/batch group, so a crash or Ctrl-C keeps what was measured)
and a re-render of an old JSON (``python -m bench.report results.json``).

Ratios: "speedup vs eager" = eager median / config median (higher is better);
"vs ind-frz" = config median / inductor_freezing median (lower is better: the targets
are phrased that way, "fusepass <= 0.9x Inductor-with-freezing").
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REFERENCE = "inductor_freezing"
# fusepass's targets (issue #6)
TARGET_LAT_CNN, TARGET_LAT_TRANSFORMER, TARGET_LAT_GEOMEAN = 0.9, 1.0, 0.9
TARGET_SPEEDUP_EAGER, TARGET_COMPILE, TARGET_RSS, TARGET_REL_ERR = 1.5, 0.1, 1.0, 1e-4


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def _index(results):
    return {(r["model"], r["batch"], r["config"]): r for r in results}


def _ok(r):
    return r is not None and r.get("status") == "ok" and "latency_ms" in r


def _med(r):
    return r["latency_ms"]["median"] if _ok(r) else float("nan")


def _fmt(x, spec=".2f", none="–"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _mark(ok):
    return "✅" if ok else "❌"


def _short_counts(d: dict, n: int = 6) -> str:
    items = sorted(d.items(), key=lambda kv: -kv[1])
    s = ", ".join(f"{k}×{v}" for k, v in items[:n])
    return s + (", …" if len(items) > n else "")


def _notes(r, idx) -> str:
    if r.get("status") == "skipped":
        return "skipped: " + r.get("reason", "")
    if r.get("status") is None:
        return "pending"
    if r.get("status") != "ok":
        err = " ".join(r.get("error", "?").split())  # one table row: no newlines
        return f"**error** [{r.get('stage', '?')}]: " + err.replace("|", "\\|")[:160]
    info, notes = r.get("info") or {}, []
    if "freezing_ran" in info:
        notes.append(f"frozen {info['frozen_constants']}/{info['freeze_graph_inputs']} inputs"
                     if info["freezing_ran"] else "not frozen")
    if info.get("warning"):
        notes.append("⚠ " + info["warning"])
    if r.get("discarded_runs") or r.get("contaminated_runs"):
        notes.append(f"{r.get('discarded_runs', 0)} busy runs redone, "
                     f"{r.get('contaminated_runs', 0)} kept busy")
    if info.get("graph_breaks"):
        notes.append(f"{info['graph_breaks']} graph breaks")
    if "err_vs_converted" in info:  # int8 rows: error against the converted graph run eagerly
        notes.append(f"rel L2 err vs converted {info['err_vs_converted']:.2g}"
                     + (f", quantize {info['quantize_s']} s" if "quantize_s" in info else "")
                     + (", reduce_range" if info.get("reduce_range") else ""))
    fp = r.get("fusepass")
    if fp:
        if fp.get("error"):
            notes.append("explain failed: " + fp["error"][:80])
        else:
            notes.append(_short_counts(fp.get("counts", {})) or "no rewrites")
            if fp.get("fell_back"):
                notes.append("**fell back**")
    if r["config"] in ("ipex_jit", "ipex_backend"):
        base = idx.get((r["model"], r["batch"], "eager_ipexenv"))
        if _ok(base):
            notes.append(f"{_med(base) / _med(r):.2f}× vs eager@torch{base.get('torch', '?')[:3]}")
    return "; ".join(notes).replace("|", "\\|")


def markdown(data: dict) -> str:
    meta, results = data.get("meta", {}), data.get("results", [])
    idx = _index(results)
    out = [f"# fusepass bench — {meta.get('started', '')}", ""]
    m = meta.get("machine", {})
    out.append(f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
               + (f"(family/model {m['cpu_family_model']}, ISA {' '.join(m['isa_flags']) or 'none listed'}), "
                  if m.get("isa_flags") is not None else "")
               + f"{_fmt(m.get('mem_gb'), '.0f')} GB; threads {meta.get('settings', {}).get('threads')}; "
               f"load avg at start {m.get('loadavg_start', '?')}, end {m.get('loadavg_end', '?')}.")
    envs = meta.get("envs", {})
    out.append("Environments: " + "; ".join(
        f"{k}: torch {v.get('torch')}" + (f", ipex {v['intel_extension_for_pytorch']}"
                                          if v.get("intel_extension_for_pytorch") else "")
        + f", transformers {v.get('transformers')}"
        + "".join(f", {p} {v[p]}" for p in ("openvino", "onnxruntime") if v.get(p))
        for k, v in envs.items()))
    s = meta.get("settings", {})
    codes = {}
    for r in results:
        c = r.get("code")
        if c and r.get("config") == "fusepass":
            codes.setdefault(c["source_hash"], c)
    if codes:
        out.append("fusepass code measured: " + "; ".join(
            f"{c['source_hash']} (HEAD {c['git_head']}" + (f" + {c['uncommitted']} uncommitted files"
                                                          if c["uncommitted"] else "") + ")"
            for c in codes.values())
            + (" — **the code changed during the run**: fusepass rows measured different versions"
               if len(codes) > 1 else "") + ".")
    if meta.get("merged"):
        out.append("Merged from %d runs (a later run's rows replace an earlier one's): " % len(meta["merged"])
                   + "; ".join(f"{m.get('started')}: {', '.join(m.get('models', {}))} "
                               f"(load avg {m.get('machine', {}).get('loadavg_start', '?')} → "
                               f"{m.get('machine', {}).get('loadavg_end', '?')})" for m in meta["merged"]) + ".")
    if meta.get("quiet_wait_s"):
        out.append(f"Waited {meta['quiet_wait_s'] / 60:.1f} min in total for the shared machine to be quiet.")
    out.append(f"fp32, torch.no_grad(), HF attention `{s.get('attn')}`; rounds {s.get('rounds')}, "
               f"iters/round {s.get('iters') or 'auto (~%s s per config per round)' % s.get('round_time')}, "
               f"fresh Inductor cache per worker: {s.get('fresh_cache')}; "
               f"OMP_WAIT_POLICY {s.get('omp_wait_policy') or 'unset (libgomp default: spin, then sleep)'}; "
               f"glibc malloc {'retaining freed memory (--malloc-retain)' if s.get('malloc_retain') else 'default'}.")
    out += ["", "## Results", "",
            "Latency: median over all timed calls, IQR = q3 − q1 (ms). speedup = eager median / "
            "config median; vs ind-frz = config median / inductor_freezing median (lower is better). "
            "compile = wall time of the model's first call incl. any setup; init = the first call "
            "of a tiny net compiled the same way just before, in the same process (the one-time "
            "torch.compile set-up every config pays once per process; compile + init ≈ a cold "
            "first call; empty with --cold-compile, where compile includes it). RSS = peak RSS of the worker "
            "process (MB). err = max |out − eager|, rel = err / max |eager|. bg cores = CPU cores "
            "the rest of the machine used during this config's timed runs (mean; the box is "
            "shared: > 0.5 means the numbers are disturbed).", "",
            "| model | bs | config | median ms | IQR ms | min ms | speedup vs eager | vs ind-frz "
            "| compile s | init s | peak RSS MB | max abs err | rel err | bg cores | notes |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        eager = idx.get((r["model"], r["batch"], "eager"))
        ref = idx.get((r["model"], r["batch"], REFERENCE))
        ok = _ok(r)
        lat = r["latency_ms"] if ok else {}
        out.append("| " + " | ".join([
            r["model"], str(r["batch"]), r["config"], _fmt(lat.get("median")), _fmt(lat.get("iqr")),
            _fmt(lat.get("min")),
            _fmt(_med(eager) / _med(r) if ok and _ok(eager) else None, ".2f") + ("×" if ok and _ok(eager) else ""),
            _fmt(_med(r) / _med(ref) if ok and _ok(ref) else None, ".2f") + ("×" if ok and _ok(ref) else ""),
            _fmt(r.get("compile_s") if ok else None, ".1f"),
            _fmt(r.get("init_s") if ok else None, ".1f"),
            _fmt(r.get("peak_rss_mb") if ok else None, ".0f"),
            _fmt(r.get("max_abs_err") if ok else None, ".1e"),
            _fmt(r.get("max_rel_err") if ok else None, ".1e"),
            _fmt(r.get("background_cores_mean") if ok else None, ".2f"),
            _notes(r, idx)]) + " |")
    out += ["", *targets(results, idx)]
    from bench import targets as issue_targets  # imports this module's helpers
    out += issue_targets.sections(results, idx, m)
    out += ceiling_section(results, idx, m.get("peak") or {})
    out += fusepass_section(results)
    out += profile_section(results)
    errs = [r for r in results if r.get("status") == "error"]
    if errs:
        out += ["", "## Errors", ""]
        for r in errs:
            out.append(f"- **{r['model']} bs{r['batch']} {r['config']}** [{r.get('stage')}]: "
                       f"`{r.get('error', '').strip()[:1500]}` (log: `{r.get('log', '')}`)")
    return "\n".join(out) + "\n"


def targets(results, idx) -> list:
    """fusepass against issue #6's targets, per (model, batch) and overall."""
    groups = sorted({(r["model"], r["batch"]) for r in results}, key=lambda g: (g[1], g[0]))
    kinds = {r["model"]: r.get("kind", "cnn") for r in results}
    rows, lat, spd, cmp_, rss, bcmp, cold = [], [], [], [], [], [], []
    for model, bs in groups:
        fp, ref, eager = (idx.get((model, bs, c)) for c in ("fusepass", REFERENCE, "eager"))
        if fp is None:
            continue
        if not _ok(fp):
            rows.append(f"| {model} | {bs} | fusepass: {fp.get('status') or 'pending'} | | | | | |")
            continue
        goal = TARGET_LAT_TRANSFORMER if kinds.get(model) == "transformer" else TARGET_LAT_CNN
        cells = [model, str(bs)]
        if _ok(ref):
            ratio = _med(fp) / _med(ref)
            lat.append(ratio)
            cells.append(f"{ratio:.2f}× (≤{goal}) {_mark(ratio <= goal)}")
            c = fp["compile_s"] / ref["compile_s"]
            cmp_.append(c)
            text = f"{c:.3f}× (≤{TARGET_COMPILE}) {_mark(c <= TARGET_COMPILE)}"
            if fp.get("init_s") is not None and ref.get("init_s") is not None:
                k = (fp["compile_s"] + fp["init_s"]) / (ref["compile_s"] + ref["init_s"])
                cold.append(k)
                text += f"; cold {k:.3f}×"
            cells.append(text)
            m = fp["peak_rss_mb"] / ref["peak_rss_mb"]
            rss.append(m)
            cells.append(f"{m:.2f}× (≤1) {_mark(m <= TARGET_RSS)}")
        else:
            cells += ["no ref"] * 3
        if _ok(eager):
            sp = _med(eager) / _med(fp)
            spd.append(sp)
            cells.append(f"{sp:.2f}×")
        else:
            cells.append("–")
        e = fp.get("max_rel_err", float("nan"))
        cells.append(f"{e:.1e} {_mark(e <= TARGET_REL_ERR)}")
        fb, rb = ((x or {}).get("info", {}).get("backend_s") for x in (fp, ref))
        if fb and rb:
            cells.append(f"{fb:.2f} s / {rb:.1f} s = {fb / rb:.3f}×")
            bcmp.append(fb / rb)
        else:
            cells.append("–")
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    out = ["## fusepass against the targets", "",
           "| model | bs | latency fusepass / ind-frz | compile fusepass / ind-frz | peak RSS fusepass / ind-frz "
           "| speedup vs eager | rel err (≤1e-4) | backend-only compile |", "|---|---:|---|---|---|---:|---|---|",
           *rows, "",
           "backend-only compile: seconds inside the torch.compile backend (Dynamo's "
           "`call_user_compiler`), fusepass vs inductor_freezing — compile time without Dynamo's "
           "own tracing, which both pay. compile: the model's first call after the process's "
           "one-time torch.compile set-up (see init s); cold: compile + init, as a fresh "
           "process's first call would be.", ""]
    g_lat, g_spd = geomean(lat), geomean(spd)
    if lat:
        out.append(f"- geomean latency fusepass / inductor_freezing: **{_fmt(g_lat)}×** "
                   f"(target ≤ {TARGET_LAT_GEOMEAN}) {_mark(g_lat <= TARGET_LAT_GEOMEAN)}")
    if spd:
        out.append(f"- geomean speedup of fusepass vs eager: **{_fmt(g_spd)}×** "
                   f"(target ≥ {TARGET_SPEEDUP_EAGER}) {_mark(g_spd >= TARGET_SPEEDUP_EAGER)}")
    if cmp_:
        out.append(f"- compile time fusepass / inductor_freezing: geomean {_fmt(geomean(cmp_), '.3f')}×, "
                   f"worst {_fmt(max(cmp_), '.3f')}× (target ≤ {TARGET_COMPILE})")
    if cold:
        out.append(f"- cold first call (compile + init) fusepass / inductor_freezing: geomean "
                   f"{geomean(cold):.3f}×, worst {max(cold):.3f}×")
    if bcmp:
        out.append(f"- backend-only compile time fusepass / inductor_freezing: geomean "
                   f"{geomean(bcmp):.3f}×, worst {max(bcmp):.3f}×")
    if rss:
        out.append(f"- peak RSS fusepass / inductor_freezing: worst {_fmt(max(rss))}× (target ≤ 1)")
    ind = [_med(idx[(m, b, REFERENCE)]) / _med(idx[(m, b, "eager")]) for m, b in groups
           if _ok(idx.get((m, b, REFERENCE))) and _ok(idx.get((m, b, "eager")))]
    if ind:
        out.append(f"- for context, geomean speedup of inductor_freezing vs eager: {_fmt(1 / geomean(ind))}×")
    return out


FLOOR = "dynamo_only"  # torch.compile with a do-nothing backend (bench/configs.py)


def ceiling_section(results, idx, peak: dict) -> list:
    """What the machine and Dynamo allow at best: each model's arithmetic rate against the
    measured fp32 peak (bench/ceiling.py), and the compile-time floor any torch.compile
    backend stands on (the dynamo_only config)."""
    groups = sorted({(r["model"], r["batch"]) for r in results}, key=lambda g: (g[1], g[0]))
    top = peak.get("peak_gflops")
    rows = []
    for model, bs in groups:
        eager, ref, fp, floor = (idx.get((model, bs, c)) for c in ("eager", REFERENCE, "fusepass", FLOOR))
        gflop = (eager or {}).get("gflop")
        cells = [model, str(bs), _fmt(gflop, ".1f")]
        for r in (ref, fp):
            rate = gflop / (_med(r) / 1e3) if gflop and _ok(r) else None
            share = f" ({100 * rate / top:.0f} %)" if rate and top else ""
            cells.append(_fmt(rate, ".0f") + share)
        need = gflop / (0.9 * _med(ref) / 1e3) if gflop and _ok(ref) else None
        cells.append(f"{100 * need / top:.0f} %" if need and top else "–")
        if _ok(floor) and _ok(ref):
            cells.append(f"{floor['compile_s']:.2f} / {ref['compile_s']:.1f} s = "
                         f"{floor['compile_s'] / ref['compile_s']:.3f}×")
        else:
            cells.append("–")
        cells.append(f"{_med(floor) / _med(eager):.2f}×" if _ok(floor) and _ok(eager) else "–")
        if gflop or _ok(floor):
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = (f"measured fp32 peak {top:.0f} GFLOP/s (sgemm {peak.get('sgemm_gflops')}, "
            f"oneDNN 3×3 conv {peak.get('conv_gflops')}; bench/ceiling.py)" if top else
            "no peak measured (--smoke, or bench/ceiling.py failed: "
            f"{peak.get('error', 'not run')})")
    return ["", "## What the machine and Dynamo allow", "",
            f"GFLOP: one forward, torch's FlopCounterMode; rates are GFLOP / median latency, "
            f"against the {head}. 0.9× needs: the share of the peak a config 10 % faster than "
            f"inductor_freezing would have to reach. Compile floor: the {FLOOR} config's "
            "compile time (Dynamo's tracing and a backend that does nothing) over "
            "inductor_freezing's: no backend's compile ratio can be lower. dynamo_only / eager latency: "
            f"{FLOOR}'s latency over eager's.", "",
            "| model | bs | GFLOP | ind-frz GFLOP/s (of peak) | fusepass GFLOP/s (of peak) "
            "| 0.9× ind-frz needs | compile floor | dynamo_only / eager latency |",
            "|---|---:|---:|---:|---:|---:|---|---:|", *rows]


def fusepass_section(results) -> list:
    rows = [r for r in results if r["config"] == "fusepass" and r.get("fusepass")]
    if not rows:
        return []
    out = ["", "## fusepass rewrites and kernels (fusepass.explain)", ""]
    for r in rows:
        fp = r["fusepass"]
        if fp.get("error"):
            out.append(f"- **{r['model']} bs{r['batch']}**: explain failed: {fp['error']}")
            continue
        out.append(f"- **{r['model']} bs{r['batch']}**: rewrites: {_short_counts(fp.get('counts', {}), 50) or 'none'}; "
                   f"kernels: {_short_counts(fp.get('kernels', {}), 50) or 'none'}"
                   + ("; **fell back**" if fp.get("fell_back") else ""))
        for k, v in sorted(fp.get("declined", {}).items(), key=lambda kv: -kv[1])[:5]:
            out.append(f"  - declined ×{v}: {k}")
        for p in fp.get("problems", [])[:3]:
            out.append(f"  - problem: {p}")
    return out


def profile_section(results) -> list:
    rows = [r for r in results if r.get("profile")]
    if not rows:
        return []
    out = ["", "## Where the time goes (torch.profiler, self CPU time per call, top ops)", ""]
    for r in rows:
        ops = "; ".join(f"`{p['op']}` {p['self_ms']:.2f} ms ({p['pct']:.0f}%, ×{p['calls']:g})"
                        for p in r["profile"][:6])
        out.append(f"- {r['model']} bs{r['batch']} **{r['config']}**: {ops}")
    return out


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = [r for r in data.get("results", []) if _ok(r)]
    idx = _index(results)
    batches = sorted({r["batch"] for r in results})
    models = list(dict.fromkeys(r["model"] for r in results))
    configs = list(dict.fromkeys(r["config"] for r in results))
    if not results:
        return False
    fig, axes = plt.subplots(len(batches) + 1, 1, figsize=(max(8, 1.6 * len(models) * 1.5),
                                                          3.6 * (len(batches) + 1)), squeeze=False)
    width = 0.8 / max(1, len(configs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, bs in enumerate(batches + [None]):
        ax = axes[row][0]
        for ci, cfg in enumerate(configs):
            xs, ys, lo, hi = [], [], [], []
            for mi, model in enumerate(models):
                key = (model, bs if bs is not None else batches[-1], cfg)
                r, eager = idx.get(key), idx.get(key[:2] + ("eager",))
                if r is None:
                    continue
                if bs is None:
                    # compile time panel: largest batch
                    y = r.get("compile_s")
                    yl = yh = 0
                elif eager is not None:
                    y = _med(eager) / _med(r)
                    yl = y - _med(eager) / r["latency_ms"]["q3"]
                    yh = _med(eager) / r["latency_ms"]["q1"] - y
                else:
                    continue
                xs.append(mi + (ci - (len(configs) - 1) / 2) * width)
                ys.append(y)
                lo.append(max(0, yl))
                hi.append(max(0, yh))
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi] if bs is not None else None, label=cfg,
                       color=colors[ci % len(colors)], capsize=2)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        if bs is None:
            ax.set_yscale("log")
            ax.set_ylabel("compile s (first call)")
            ax.set_title(f"compile time, batch {batches[-1]} (log scale)")
        else:
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_ylabel("speedup vs eager")
            ax.set_title(f"batch {bs}: speedup vs eager (median, whiskers = IQR)")
        ax.grid(axis="y", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8, ncol=min(4, len(configs)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(data: dict, out_dir: Path, png: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown(data))
    if png and plot(data, out_dir / "latency.png"):
        paths["png"] = out_dir / "latency.png"
    return paths


def merge(datas: list) -> dict:
    """Results of several runs as one: a later run's row replaces an earlier one with the
    same (model, batch, config), in the earlier one's place (e.g. redo the conv nets on a
    quiet machine). The first run's meta stays; ``meta["merged"]`` keeps every run's."""
    out = {"meta": dict(datas[0]["meta"]), "results": []}
    pos = {}
    for d in datas:
        for r in d["results"]:
            key = (r["model"], r["batch"], r["config"])
            row = {**r, "run": d["meta"].get("started")}
            if key in pos:
                out["results"][pos[key]] = row
            else:
                pos[key] = len(out["results"])
                out["results"].append(row)
    if len(datas) > 1:
        out["meta"]["merged"] = [d["meta"] for d in datas]
        out["meta"]["started"] = " + ".join(str(d["meta"].get("started")) for d in datas)
        out["meta"]["quiet_wait_s"] = sum(d["meta"].get("quiet_wait_s") or 0 for d in datas)
    return out


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="re-render results.json (several: merged, later "
                                            "runs' rows replacing earlier ones)")
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="default: the folder of the (first) JSON")
    args = p.parse_args(argv)
    if len(args.json) > 1 and not args.out:
        p.error("merging needs --out")
    data = merge([json.loads(j.read_text()) for j in args.json])
    print(write(data, args.out or args.json[0].parent))


if __name__ == "__main__":
    main()
