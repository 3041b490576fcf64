"""Deployment costs (issue 17): what a fresh process pays before its first output.

    python -m bench.deploy --models resnet50,bert_base     # the real run (~5 min, quiet machine)
    python -m bench.deploy --smoke --out /tmp/d            # tiny model: proves it works (~1 min)

Each measurement runs in a FRESH process (``--worker``), model built and input made before
the clock starts, all under ``torch.no_grad()`` with ``torch.set_num_threads(--threads)``:

* ``compile``: ``torch.compile(model, backend="fusepass")`` + first call;
* ``load``: ``fusepass.load(file)`` + first call (the file written beforehand by ``save``);
* ``cache_cold`` / ``cache_warm``: ``torch.compile(backend="fusepass",
  options={"cache_dir": d})`` + first call, on an empty cache and then, in another
  process, on the cache the cold one wrote;
* ``dynamo_floor``: ``torch.compile(backend="eager")`` + first call: Dynamo alone, the floor
  of any backend's first call;
* sizes: the saved file vs ``torch.save(model.state_dict())``.

Every time but ``load`` is import of ``torch._dynamo`` + the timed section (the import,
which ``torch.compile`` pays, is also reported alone: ``*_import_s``); ``load``'s is the
timed section alone (it imports no ``torch._dynamo``: ``load_imported_dynamo`` says
whether it did); ``import fusepass`` and the model's construction are not counted.

The issue's targets are printed beside: load ≤ 0.1x compile, warm cache ≤ 1.25x the
Dynamo floor, file ≤ 1.1x the state_dict. Outputs: ``deploy.json`` and ``deploy.md`` in
``--out`` (default ``bench/results/deploy-<timestamp>``). Do not run it beside other
benchmarks: first-call times on a shared 2-core machine measure the neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("compile", "load", "cache_cold", "cache_warm", "dynamo_floor")


def _model(name):
    from bench.models import MODELS
    spec = MODELS[name]
    return spec.build(0), spec.inputs(1)


def worker(kind, model_name, path, cache, out, threads) -> dict:
    import torch
    torch.set_num_threads(threads)
    model, inputs = _model(model_name)
    import fusepass
    # torch._dynamo's import (~1.1-4 s) is paid by torch.compile: timed apart, counted in
    # its totals. fusepass.load does not import it (a model's library may have: BERT's
    # transformers); whether the load pulled it in is reported
    dynamo_before = "torch._dynamo" in sys.modules
    t0 = time.perf_counter()
    if kind != "load":
        import torch._dynamo  # noqa: F401
    import_s = time.perf_counter() - t0
    with torch.no_grad():
        if kind == "save":
            t0 = time.perf_counter()
            fusepass.save(model, path, list(inputs))
            dt = time.perf_counter() - t0
            sd = Path(path).with_suffix(".state_dict.pt")
            torch.save(model.state_dict(), sd)
            return {"save_s": dt, "file_bytes": os.path.getsize(path),
                    "state_dict_bytes": os.path.getsize(sd)}
        t0 = time.perf_counter()
        if kind == "load":
            m = fusepass.load(path)
        elif kind == "dynamo_floor":
            m = torch.compile(model, backend="eager")
        elif kind == "compile":
            m = torch.compile(model, backend="fusepass")
        else:
            m = torch.compile(model, backend="fusepass", options={"cache_dir": cache})
        y = m(*inputs)
        dt = time.perf_counter() - t0
    torch.save(y, out)
    return {"first_call_s": dt, "import_s": import_s, "total_s": import_s + dt,
            "dynamo_imported_by_it": not dynamo_before and "torch._dynamo" in sys.modules}


def _run(args, kind, model, tmp):
    out = tmp / f"{model}.{kind}.out.pt"
    cmd = [sys.executable, "-m", "bench.deploy", "--worker", kind, "--models", model,
           "--file", str(tmp / f"{model}.fusepass"), "--cache", str(tmp / f"{model}.cache"),
           "--output", str(out), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FUSEPASS_CACHE_DIR", None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker {kind} {model} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _same(a, b) -> bool:
    import torch
    la = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def measure(args, model) -> dict:
    import torch
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-deploy-{model}-"))
    row = {"model": model, **_run(args, "save", model, tmp)}
    for kind in KINDS:  # cache_cold before cache_warm: the warm one reads what it wrote
        r = _run(args, kind, model, tmp)
        row[f"{kind}_s"], row[f"{kind}_import_s"] = r["total_s"], r["import_s"]
        row[f"{kind}_imported_dynamo"] = r["dynamo_imported_by_it"]
    outs = {k: torch.load(tmp / f"{model}.{k}.out.pt", weights_only=False) for k in KINDS}
    row["load_equals_compile"] = _same(outs["load"], outs["compile"])
    row["warm_equals_cold"] = _same(outs["cache_warm"], outs["cache_cold"])
    row["load_over_compile"] = row["load_s"] / row["compile_s"]
    row["warm_over_floor"] = row["cache_warm_s"] / row["dynamo_floor_s"]
    row["file_over_state_dict"] = row["file_bytes"] / row["state_dict_bytes"]
    return row


def markdown(rows) -> str:
    head = ("| model | compile (s) | load (s) | load/compile (≤0.1) | cold cache (s) | warm cache (s) "
            "| Dynamo floor (s) | warm/floor (≤1.25) | file (MB) | state_dict (MB) | file/sd (≤1.1) "
            "| load == compile bitwise | load imported torch._dynamo |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['compile_s']:.2f} | {r['load_s']:.2f} | {r['load_over_compile']:.3f} "
            f"| {r['cache_cold_s']:.2f} | {r['cache_warm_s']:.2f} | {r['dynamo_floor_s']:.2f} "
            f"| {r['warm_over_floor']:.2f} | {r['file_bytes'] / 1e6:.1f} | {r['state_dict_bytes'] / 1e6:.1f} "
            f"| {r['file_over_state_dict']:.3f} | {r['load_equals_compile']} "
            f"| {r['load_imported_dynamo']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,bert_base")
    p.add_argument("--smoke", action="store_true", help="the tiny model only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=("save",) + KINDS, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.models, args.file, args.cache, args.output,
                                args.threads)))
        return 0
    models = ["tiny"] if args.smoke else args.models.split(",")
    out = args.out or ROOT / "bench" / "results" / time.strftime("deploy-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        rows.append(measure(args, model))
        (out / "deploy.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
        (out / "deploy.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {out / 'deploy.json'} and {out / 'deploy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
