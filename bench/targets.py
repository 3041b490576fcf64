"""The targets of the peer, bf16 and int8 issues (#16, #18, #15), judged on one run.

Why a file of its own: report.py's "fusepass against the targets" is issue #6's (against
Inductor-freezing only). These targets compare fusepass with the live peers, per
precision, and "a target is met when one bench run shows it": each section below is
computed from the rows of one results.json and says met / not met per target, or which
row it lacks (a section whose configs did not run is left out). The thresholds are the
issues' words; they are not tuned to any result.
"""
from __future__ import annotations

from bench.report import _fmt, _mark, _med, _ok, geomean

FP32_PEERS = ("inductor_freezing", "openvino", "onnxruntime")


def _groups(results):
    return sorted({(r["model"], r["batch"]) for r in results}, key=lambda g: (g[0], g[1]))


def _vnni(machine: dict) -> bool:
    flags = set(machine.get("isa_flags") or [])
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _ratio_cell(a, b, goal) -> tuple[str, float | None]:
    if not (_ok(a) and _ok(b)):
        return "–", None
    r = _med(a) / _med(b)
    return f"{r:.2f}× {_mark(r <= goal)}", r


def _summary(name, xs, goal, worst_goal=None) -> list:
    if not xs:
        return [f"- {name}: no complete row"]
    g = geomean(xs)
    line = f"- {name}: geomean **{g:.2f}×** (target ≤ {goal}) {_mark(g <= goal)}"
    if worst_goal is not None:
        line += f"; worst {max(xs):.2f}× (target ≤ {worst_goal}) {_mark(max(xs) <= worst_goal)}"
    return [line]


def fp32_peers(results, idx, machine) -> list:
    """Issue #16: fusepass fp32 against the fastest of Inductor-freezing, OpenVINO, ORT."""
    rows, ratios = [], []
    for model, bs in _groups(results):
        fp = idx.get((model, bs, "fusepass"))
        peers = {c: idx.get((model, bs, c)) for c in FP32_PEERS}
        timed = {c: r for c, r in peers.items() if _ok(r)}
        # a run without the live peers is issue #6's business (report.targets)
        if not _ok(fp) or not timed or all(peers[c] is None for c in FP32_PEERS[1:]):
            continue
        best = min(timed, key=lambda c: _med(timed[c]))
        r = _med(fp) / _med(timed[best])
        ratios.append(r)
        rss = fp["peak_rss_mb"] / timed[best]["peak_rss_mb"]
        eager = idx.get((model, bs, "eager"))
        sp = _med(eager) / _med(fp) if _ok(eager) else None
        ref = timed.get("inductor_freezing")
        be = (fp.get("info") or {}).get("backend_s")
        comp = be / ref["compile_s"] if be and ref else None
        missing = [c for c, p in peers.items() if not _ok(p)]
        rows.append(f"| {model} | {bs} | {_med(fp):.1f} | "
                    + " | ".join(_fmt(_med(p), ".1f") if _ok(p) else (p or {}).get("status", "not run")
                                 for p in peers.values())
                    + f" | {best} | {r:.2f}× {_mark(r <= 0.95)} | {rss:.2f}× {_mark(rss <= 1)} | "
                    + (f"{sp:.2f}× {_mark(sp >= 1.5)}" if sp else "–")
                    + f" | {fp['max_rel_err']:.1e} {_mark(fp['max_rel_err'] <= 1e-4)} | "
                    + (f"{comp:.3f}× {_mark(comp <= 0.1)}" if comp else "–")
                    + (f" | missing: {', '.join(missing)}" if missing else " | ") + " |")
    if not rows:
        return []
    return ["", "## fp32 against the live peers (issue #16)", "",
            "fusepass fp32 / the fastest peer of the row (target ≤ 0.95× per row, geomean ≤ 0.9×); "
            "peak RSS against that peer's (≤ 1); speedup over eager (≥ 1.5×); error relative to "
            "eager (≤ 1e-4); fusepass's backend time over Inductor-freezing's compile (≤ 0.1×).", "",
            "| model | bs | fusepass ms | " + " | ".join(f"{c} ms" for c in FP32_PEERS)
            + " | fastest peer | fusepass / fastest | RSS / fastest's | vs eager | rel err "
              "| backend / Ind-frz compile | |",
            "|---|---:|---:|" + "---:|" * len(FP32_PEERS) + "---|---|---|---|---|---|---|",
            *rows, "", *_summary("fusepass / fastest peer", ratios, 0.9, 0.95)]


def bf16(results, idx, machine) -> list:
    """Issue #18: fusepass bf16 against Inductor autocast+freezing and OpenVINO bf16."""
    rows, vs_ind, vs_ov, over_fp32 = [], [], [], []
    skipped = []
    for model, bs in _groups(results):
        fb = idx.get((model, bs, "fusepass_bf16"))
        if fb is None:
            continue
        if fb.get("status") == "skipped":
            skipped.append(f"{model} bs{bs}: {fb.get('reason', 'skipped')}")
            continue
        if not _ok(fb):
            continue
        ind, ov, fp = (idx.get((model, bs, c)) for c in ("inductor_bf16", "openvino_bf16", "fusepass"))
        c_ind, r_ind = _ratio_cell(fb, ind, 0.9)
        c_ov, r_ov = _ratio_cell(fb, ov, 1.0)
        sp = _med(fp) / _med(fb) if _ok(fp) else None
        for xs, x in ((vs_ind, r_ind), (vs_ov, r_ov), (over_fp32, sp)):
            if x is not None:
                xs.append(x)
        err_ok = _ok(ind) and fb["max_rel_err"] <= ind["max_rel_err"]
        prec = ((ov or {}).get("info") or {}).get("ov_precision", "?") if _ok(ov) else "–"
        rows.append(f"| {model} | {bs} | {_med(fb):.1f} | {_fmt(_med(ind), '.1f')} | "
                    f"{_fmt(_med(ov), '.1f')} ({prec}) | {_fmt(_med(fp), '.1f')} | {c_ind} | {c_ov} | "
                    + (f"{sp:.2f}× {_mark(sp >= 1.6)}" if sp else "–")
                    + f" | {fb['max_rel_err']:.1e} / "
                    + (f"{ind['max_rel_err']:.1e} {_mark(err_ok)}" if _ok(ind) else "–") + " |")
    if not rows and not skipped:
        return []
    out = ["", "## bf16 (issue #18)", ""]
    if skipped:
        out += [f"- {s}" for s in skipped] + [""]
    if rows:
        out += ["fusepass bf16 against Inductor autocast+freezing (target ≤ 0.9×) and OpenVINO bf16 "
                "(≤ 1.0×; in brackets the precision its CPU plugin chose), over fusepass fp32 "
                "(≥ 1.6×); error relative to fp32 eager, fusepass's no larger than Inductor-bf16's.", "",
                "| model | bs | fusepass bf16 ms | Inductor bf16 ms | OpenVINO bf16 ms | fusepass fp32 ms "
                "| / Inductor bf16 | / OpenVINO bf16 | over fp32 | rel err fusepass / Inductor |",
                "|---|---:|---:|---:|---:|---:|---|---|---|---|", *rows, "",
                *_summary("fusepass bf16 / Inductor bf16", vs_ind, 0.9, 0.9),
                *_summary("fusepass bf16 / OpenVINO bf16", vs_ov, 1.0, 1.0)]
        if over_fp32:
            out.append(f"- over fusepass fp32: worst {min(over_fp32):.2f}× (target ≥ 1.6 on every "
                       f"row) {_mark(min(over_fp32) >= 1.6)}")
    return out


def int8(results, idx, machine) -> list:
    """Issue #15: fusepass int8 against Inductor-int8 (same converted graph) and OpenVINO
    int8 (NNCF), and over fusepass fp32 (ResNet-50: ≥ 2.5× with VNNI/AMX, ≥ 1.8× without)."""
    vnni = _vnni(machine)
    goal_rn = 2.5 if vnni else 1.8
    rows, vs_ind, vs_ov = [], [], []
    for model, bs in _groups(results):
        q = idx.get((model, bs, "fusepass_int8"))
        if not _ok(q):
            continue
        ind, ov, fp = (idx.get((model, bs, c)) for c in ("inductor_int8", "openvino_int8", "fusepass"))
        c_ind, r_ind = _ratio_cell(q, ind, 1.0)
        c_ov, r_ov = _ratio_cell(q, ov, 0.9)
        for xs, x in ((vs_ind, r_ind), (vs_ov, r_ov)):
            if x is not None:
                xs.append(x)
        sp = _med(fp) / _med(q) if _ok(fp) else None
        sp_cell = "–" if sp is None else (f"{sp:.2f}× {_mark(sp >= goal_rn)}" if model == "resnet50"
                                          else f"{sp:.2f}×")
        qi, ii = (q.get("info") or {}), ((ind or {}).get("info") or {})
        e_q, e_i = qi.get("err_vs_converted"), ii.get("err_vs_converted")
        err = (f"{e_q:.3g} / {e_i:.3g} {_mark(e_q <= e_i)}" if e_q is not None and e_i is not None
               else "–")
        comp = rss = "–"
        if _ok(ind):
            # both compile_s include the same quantization (quantize_s): compare with and without
            qs_q, qs_i = qi.get("quantize_s", 0.0), ii.get("quantize_s", 0.0)
            c = q["compile_s"] / ind["compile_s"]
            c2 = (q["compile_s"] - qs_q) / max(ind["compile_s"] - qs_i, 1e-9)
            comp = f"{c:.2f}× {_mark(c <= 0.25)}; w/o quantize {c2:.2f}× {_mark(c2 <= 0.25)}"
            m = q["peak_rss_mb"] / ind["peak_rss_mb"]
            rss = f"{m:.2f}× {_mark(m <= 1)}"
        rows.append(f"| {model} | {bs} | {_med(q):.1f} | {_fmt(_med(ind), '.1f')} | "
                    f"{_fmt(_med(ov), '.1f')} | {_fmt(_med(fp), '.1f')} | {c_ind} | {c_ov} | {sp_cell} | "
                    f"{err} | {comp} | {rss} |")
    if not rows:
        return []
    flags = " ".join(machine.get("isa_flags") or []) or "none listed"
    return ["", "## int8 (issue #15)", "",
            f"CPU ISA flags: {flags} — VNNI/AMX {'present' if vnni else 'absent'}, so ResNet-50's "
            f"target over fusepass fp32 is ≥ {goal_rn}×. fusepass int8 / Inductor-int8 (the same "
            "converted graph; geomean ≤ 0.9×, no row above 1.0×) and / OpenVINO-int8 (NNCF; ≤ 0.9×); "
            "error: relative L2 against the converted graph run eagerly, fusepass's ≤ Inductor's; "
            "compile (first call, the quantization included and without it) ≤ 0.25× Inductor-int8's; "
            "peak RSS ≤ Inductor-int8's.", "",
            "| model | bs | fusepass int8 ms | Inductor int8 ms | OpenVINO int8 ms | fusepass fp32 ms "
            "| / Inductor int8 | / OpenVINO int8 | over fp32 | err fusepass / Inductor | compile / Inductor "
            "| RSS / Inductor |",
            "|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|", *rows, "",
            *_summary("fusepass int8 / Inductor int8", vs_ind, 0.9, 1.0),
            *_summary("fusepass int8 / OpenVINO int8", vs_ov, 0.9)]


def sections(results, idx, machine) -> list:
    return fp32_peers(results, idx, machine) + bf16(results, idx, machine) + int8(results, idx, machine)
