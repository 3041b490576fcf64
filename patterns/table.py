"""The pattern table's data: a row (Rule), a match handed to guards (Match), the table.

A row is a pattern function, a replacement function, a named guard and a one-line
comment. Guards are pure: they read ``meta["val"]`` (via ``Match.val``), user counts and
dtypes, and return a reason to decline or None. ``when`` is a silent filter for rows that
share a structure but not a family (conv1d vs conv2d): a failed ``when`` is no candidate.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fusepass.ops import FUSED_OPS


@dataclass
class Match:
    gm: Any  # fx.GraphModule
    anchor: Any  # the graph node the pattern's output matched
    nodes: list  # graph nodes matched by the pattern's op nodes (anchor included)
    bindings: dict  # pattern placeholder name -> graph node or literal
    # (post, scalars, other) -> why the chosen target has no kernel for the fused op the
    # row would make, or None: the fuse pass hands in the lowering table's answer
    lowerable: Callable = lambda post, scalars, other: None

    def __getitem__(self, name):
        return self.bindings[name]

    @property
    def fused(self):
        """The conv/linear (fusepass op) node among the matched nodes."""
        return next(n for n in self.nodes if n.target in FUSED_OPS)

    def val(self, name):
        b = self.bindings[name]
        return b.meta.get("val") if hasattr(b, "meta") else b


Guard = Callable[[Match], Optional[str]]


def with_signature(fn, names):
    """Give a ``*args`` pattern/replacement factory's function named parameters: the
    engine binds pattern placeholders by these names."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fn


@dataclass(frozen=True)
class Rule:
    name: str  # dotted: "conv2d.relu"
    pattern: Callable
    replacement: Callable
    guard: Guard
    comment: str  # one line: what the row does
    when: Optional[Callable[[Match], bool]] = None


class Table:
    def __init__(self):
        self.rows: list[Rule] = []
        self._names: set[str] = set()

    def add(self, rule: Rule):
        if rule.name in self._names:
            raise ValueError(f"duplicate pattern name {rule.name!r}")
        self._names.add(rule.name)
        self.rows.append(rule)

    def extend(self, rules):
        for r in rules:
            self.add(r)

    def names(self) -> set[str]:
        return set(self._names)

    def select(self, prefix: str) -> list[Rule]:
        return [r for r in self.rows if r.name.startswith(prefix)]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)
