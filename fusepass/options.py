"""User options, one frozen dataclass shared by optimize, explain and the backend.

Unknown option names and unknown pass/pattern names in ``disable`` are errors that list
the valid ones: the only errors fusepass raises to a user.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field

LOWERINGS = ("onednn", "reference", "ipex", "auto")
PRECISIONS = ("fp32", "bf16")


class OptionError(ValueError):
    pass


@dataclass(frozen=True)
class Options:
    # Kernel target for fused regions: "onednn" (stock torch.ops.mkldnn), "reference"
    # (plain ATen), "ipex" (Intel Extension for PyTorch), "auto" (ipex if importable).
    lowering: str = "onednn"
    # Pass names ("fold_batchnorm") or pattern rows / globs ("conv2d.relu", "linear.*").
    disable: frozenset = field(default_factory=frozenset)
    # Run the reference graph beside the optimized one on first call; raise on divergence.
    check: bool = field(default_factory=lambda: os.environ.get("FUSEPASS_CHECK", "0") == "1")
    # After every pass: graph.lint() and a fake-tensor re-propagation compared with meta
    # (shapes, dtypes, strides); a failure raises. The test suite turns it on everywhere.
    verify: bool = field(default_factory=lambda: os.environ.get("FUSEPASS_VERIFY", "0") == "1")
    # Rounds of the rewrite engine's fixpoint per pass: fusion, and folding (a fold can
    # expose another: BN after a folded constant, chains of user-written constant ops).
    fuse_rounds: int = 8
    fold_rounds: int = 64
    # Compute precision of conv/linear regions: "fp32" (never lowered silently) or "bf16"
    # (autocast's bf16 policy, fp32 at the graph's edges) where the target has native
    # bf16 kernels; decided per CPU before capture (fusepass/precision.py), reported.
    precision: str = "fp32"
    # Compile cache directory (fusepass/cache.py): the target-neutral graph of each variant,
    # keyed by the captured graph, its weights' digest, options, versions, CPU and threads.
    cache_dir: str | None = field(default_factory=lambda: os.environ.get("FUSEPASS_CACHE_DIR") or None)

    @classmethod
    def from_kwargs(cls, options=None, **kwargs) -> "Options":
        if isinstance(options, Options):
            if kwargs:
                options = dataclasses.replace(options, **kwargs)
            return options
        merged = {**(options or {}), **kwargs}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(merged) - set(valid))
        if unknown:
            raise OptionError(f"unknown fusepass option(s) {unknown}; valid options: {valid}")
        if "disable" in merged:
            d = merged["disable"]
            merged["disable"] = frozenset([d] if isinstance(d, str) else d)
        opts = cls(**merged)
        opts.validate()
        return opts

    def validate(self):
        for name in ("fuse_rounds", "fold_rounds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise OptionError(f"{name}={v!r}; valid: a positive int")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise OptionError(f"cache_dir={self.cache_dir!r}; valid: a directory path or None")
        if self.lowering not in LOWERINGS:
            raise OptionError(f"lowering={self.lowering!r}; valid: {list(LOWERINGS)}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"precision={self.precision!r}; valid: {list(PRECISIONS)}")
        names = known_names()
        for pat in self.disable:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise OptionError(f"disable={pat!r} names no pass or pattern; valid names: {sorted(names)}")

    def enabled(self, name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, pat) for pat in self.disable)


def known_names() -> list[str]:
    from fusepass.pipeline import PASS_NAMES
    from fusepass.patterns import TABLE
    return list(PASS_NAMES) + [r.name for r in TABLE.rows]
