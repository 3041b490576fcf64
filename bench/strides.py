"""Strides bench (issue 14): do fusepass's outputs keep eager's strides, and what does
keeping them cost? Per model, the torch.compile(backend="fusepass") graph against eager:
output strides equal (size-1 dims included), the kernels and views the optimized graph
runs (``as_strided``: the restrides ``fusepass.ir.restride`` adds), the compile time and
a short median latency. Short by design (a few calls, one process): the coordinator's
long benches (``python -m bench``) decide speed; this says whether the graph changed.

    python -m bench.strides [--models resnet50,efficientnet_b0,bert_base] [--batch 1]
                            [--iters 15] [--out bench/results/strides.json]

CNNs run channels-last (model and input contiguous), as ``bench``'s fusepass config.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.models import MODELS


def measure(name: str, batch: int, iters: int) -> dict:
    from fusepass.backend import fusepass_backend
    spec = MODELS[name]
    model, inputs = spec.build(0), spec.inputs(batch, 0)
    if spec.kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
    seen = []

    def backend(gm, example_inputs):
        compiled = fusepass_backend(gm, example_inputs)
        seen.append(compiled)
        return compiled

    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fn(*inputs)
        compile_s = time.perf_counter() - t0
        want = model(*inputs)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - t)
    ops = collections.Counter(str(n.target) for c in seen for v in c.variants.values()
                              if v.gm is not None for n in v.gm.graph.nodes if n.op == "call_function")
    leaves = torch.utils._pytree.tree_leaves
    return {"model": name, "batch": batch,
            "strides_equal_eager": all(g.stride() == w.stride() for g, w in zip(leaves(out), leaves(want))),
            "as_strided_views": ops.get("aten.as_strided.default", 0),
            "compile_s": round(compile_s, 2), "median_ms": round(1e3 * statistics.median(times), 2),
            "ops": dict(sorted(ops.items()))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,efficientnet_b0,bert_base")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = [measure(m, a.batch, a.iters) for m in a.models.split(",")]
    for r in rows:
        print({k: v for k, v in r.items() if k != "ops"})
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"cpu": platform.processor() or platform.machine(),
                                           "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
