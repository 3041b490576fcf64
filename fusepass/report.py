"""The report: every decision fusepass takes, per candidate, with its reason.

Passes record what they rewrote and what they declined (and why); lowering records
which kernel each fused op got; capture records whether weights were frozen. The report
is attached to every optimized graph (``gm.fusepass_report``), returned by
``fusepass.explain`` and printable as a table.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

ACTIONS = ("rewritten", "declined", "lowered", "kept", "error", "fallback", "info")


@dataclass(frozen=True)
class Decision:
    stage: str  # pass or stage name: "capture", "fuse", "fold_batchnorm", "lower", ...
    rule: str  # pattern row, lowering entry, or "-"
    node: str  # the graph node the decision is about
    action: str  # one of ACTIONS
    reason: str = ""

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")


@dataclass
class Report:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, stage, rule, node, action, reason=""):
        self.decisions.append(Decision(stage, rule, str(node), action, reason))

    def extend(self, other: "Report"):
        self.decisions.extend(other.decisions)

    def where(self, **kw) -> list[Decision]:
        return [d for d in self.decisions if all(getattr(d, k) == v for k, v in kw.items())]

    @property
    def counts(self) -> dict[str, int]:
        """Rewrites per pattern-table row: {"conv2d.relu": 16, "fold.bn.conv": 53, ...}."""
        from fusepass.patterns import TABLE
        rows = TABLE.names()
        return {k: v for k, v in self.rewrites.items() if k in rows}

    @property
    def rewrites(self) -> dict[str, int]:
        """Every rewrite per rule, pattern rows and pass-level ones (prepack, layout)."""
        return dict(Counter(d.rule for d in self.decisions if d.action == "rewritten"))

    @property
    def declined(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "declined"]

    @property
    def kernels(self) -> dict[str, int]:
        """Lowered fused ops per kernel: {"mkldnn._convolution_pointwise": 53, ...}."""
        return dict(Counter(d.rule for d in self.decisions if d.action == "lowered"))

    @property
    def fell_back(self) -> bool:
        return any(d.action == "fallback" for d in self.decisions)

    def to_dict(self):
        return {"counts": self.counts, "rewrites": self.rewrites, "kernels": self.kernels,
                "decisions": [asdict(d) for d in self.decisions]}

    def summary(self) -> str:
        lines = []
        if self.rewrites:
            lines.append("rewritten: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.rewrites.items())))
        if self.kernels:
            lines.append("kernels:   " + ", ".join(f"{k} x{v}" for k, v in sorted(self.kernels.items())))
        reasons = Counter((d.rule, d.reason) for d in self.declined)
        for (rule, reason), n in sorted(reasons.items()):
            lines.append(f"declined:  {rule} x{n}: {reason}")
        for d in self.decisions:
            if d.action in ("error", "fallback", "info"):
                lines.append(f"{d.action}: [{d.stage}] {d.node}: {d.reason}")
        return "\n".join(lines) or "(no decisions)"

    def __str__(self):
        rows = [("stage", "rule", "node", "action", "reason")]
        rows += [(d.stage, d.rule, d.node, d.action, d.reason) for d in self.decisions]
        widths = [min(max(len(r[i]) for r in rows), 40) for i in range(4)]
        out = []
        for i, r in enumerate(rows):
            out.append("  ".join(c.ljust(w)[:w] for c, w in zip(r[:4], widths)) + "  " + r[4])
            if i == 0:
                out.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        return "\n".join(out) + "\n\n" + self.summary()

    __repr__ = summary
