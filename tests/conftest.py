"""Shared test set-up: hypothesis profiles, the after-every-pass verifier, and the
watch on every report's decisions (a contained failure is a failed test)."""
import os
import re

import pytest
from hypothesis import HealthCheck, settings

from fusepass.report import Report
from tests.util import EXPECTED_DECISIONS

_common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=250, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "expect_fallback(*patterns): the test provokes an 'error' or 'fallback' decision on "
        "purpose (and asserts it). With patterns (regexes), every such decision must match "
        "one of them in '<stage>: <reason>'; the test must record at least one.")
    config.addinivalue_line(
        "markers",
        "expect_kept(*patterns): the test leaves a fused op on the reference kernel "
        "('kept' at stage 'lower') on purpose (and asserts it); patterns as expect_fallback.")


@pytest.fixture(autouse=True)
def verify_every_pass(monkeypatch):
    """graph.lint() + fake-tensor re-propagation (shapes, dtypes, strides) after every
    pass, in every test: ``Options.verify``'s default reads FUSEPASS_VERIFY."""
    monkeypatch.setenv("FUSEPASS_VERIFY", "1")
    monkeypatch.delenv("FUSEPASS_CACHE_DIR", raising=False)  # a developer's cache: not in tests


# The containment layers (a pass that raises is undone, a lowering error keeps the op, a
# variant that raises at run time runs eager, capture failing runs unoptimized) turn a bug
# into a silent slowdown that every numerics assertion passes. Each of them records its
# decision in a Report, so watching Report.record sees all of them: optimize(), Dynamo
# backends, Compiled.history, run-time variant reports.
WATCHED = {"expect_fallback": lambda d: d.action in ("error", "fallback"),
           "expect_kept": lambda d: d.action == "kept" and d.stage == "lower"}


def _allowed(marker, d) -> bool:
    if marker is None:
        return False
    return not marker.args or any(re.search(p, f"{d.stage}: {d.reason}") for p in marker.args)


NO_NATIVE_BF16 = "bf16 path needs the cpu support"  # oneDNN's words on an AVX2-only CPU


def _describe(ds) -> str:
    """One line per distinct decision (hypothesis tests repeat them per example)."""
    groups = {}
    for d in ds:
        groups.setdefault((d.stage, d.action, d.rule, d.reason), []).append(d.node)
    lines = [f"  [{stage}] {action} {rule} {nodes[0]}: {reason}"
             + (f"  (x{len(nodes)})" if len(nodes) > 1 else "")
             for (stage, action, rule, reason), nodes in groups.items()]
    if any(NO_NATIVE_BF16 in d.reason for d in ds):
        lines.append("  (this CPU has no native bf16, tests.util.NATIVE_BF16: oneDNN's bf16 "
                     "kernels raise here; fusepass must decline bf16 before lowering, not fail)")
    return "\n".join(lines)


def contained_failures(seen, marker_of) -> list:
    """What the watch objects to in the decisions ``seen`` during one test;
    ``marker_of(name)`` is the test's closest marker of that name, or None."""
    problems = []
    for name, is_watched in WATCHED.items():
        marker = marker_of(name)
        hits = [d for d in seen if is_watched(d)]
        bad = [d for d in hits if not _allowed(marker, d)]
        if bad:
            mark = "absent" if marker is None else f"marked for {marker.args!r}"
            problems.append(f"{len(bad)} unexpected decision(s) ({name} is {mark}):\n"
                            + _describe(bad))
        if marker is not None and not hits:
            problems.append(f"marked {name} but no such decision was recorded: stale mark")
    return problems


def not_expected(seen) -> list:
    """``seen`` without the very Decision objects a test passed to
    ``tests.util.expect_decisions`` (an equal decision recorded again is still watched)."""
    expected = {id(d) for d in EXPECTED_DECISIONS}
    return [d for d in seen if id(d) not in expected]


@pytest.fixture(autouse=True)
def no_silent_fallback(request, monkeypatch):
    """Fail the test when any Report recorded an ``error`` or ``fallback`` decision, or a
    ``kept`` at stage ``lower`` (a fused op left on the reference kernel), unless it is
    marked ``expect_fallback`` / ``expect_kept``. A marked test must record one."""
    seen = []
    record = Report.record

    def watching(self, stage, rule, node, action, reason=""):
        record(self, stage, rule, node, action, reason)
        d = self.decisions[-1]
        if any(is_watched(d) for is_watched in WATCHED.values()):
            seen.append(d)

    monkeypatch.setattr(Report, "record", watching)
    EXPECTED_DECISIONS.clear()
    yield seen
    left = not_expected(seen)
    EXPECTED_DECISIONS.clear()
    problems = contained_failures(left, request.node.get_closest_marker)
    if problems:
        pytest.fail("report watch (tests/conftest.py): fusepass contained a failure this test "
                    "does not expect, or a mark is stale:\n" + "\n".join(problems),
                    pytrace=False)
