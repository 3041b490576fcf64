"""The suite's watch on reports (tests/conftest.py): a contained failure -- an ``error`` or
``fallback`` decision, a fused op ``kept`` on the reference kernel -- fails the test that
did not mark it, with its stage, node and reason; a mark names what it expects and goes
stale when nothing of the kind happens."""
from __future__ import annotations

import pytest

from fusepass.report import Decision, Report
from tests.conftest import contained_failures, not_expected
from tests.util import expect_decisions


def markers(**marks):
    return lambda name: marks.get(name)


FALLBACK = Decision("runtime", "-", "conv_1", "fallback",
                    "RuntimeError: boom; this variant now runs unoptimized")
ERROR = Decision("fuse", "-", "-", "error", "ValueError: bad (pass undone)")
KEPT = Decision("lower", "reference", "conv_2", "kept",
                "no oneDNN conv kernel for post-op chain ['elu']")


def test_an_unmarked_fallback_error_or_kept_is_listed_with_stage_node_and_reason():
    problems = contained_failures([FALLBACK, ERROR, KEPT], markers())
    text = "\n".join(problems)
    assert len(problems) == 2  # one for fallback/error, one for kept
    assert "[runtime] fallback - conv_1: RuntimeError: boom" in text
    assert "[fuse] error - -: ValueError: bad" in text
    assert "[lower] kept reference conv_2: no oneDNN conv kernel" in text


def test_other_decisions_are_not_watched():
    others = [Decision("fuse", "conv2d.relu", "n", a, "")
              for a in ("rewritten", "declined", "info")]
    others.append(Decision("prepack_weights", "-", "n", "kept", "a kept outside lowering"))
    assert contained_failures(others, markers()) == []


def test_a_mark_with_patterns_tolerates_only_what_matches():
    mark = pytest.mark.expect_fallback(r"^runtime: RuntimeError: boom").mark
    assert contained_failures([FALLBACK], markers(expect_fallback=mark)) == []
    (problem,) = contained_failures([FALLBACK, ERROR], markers(expect_fallback=mark))
    assert "[fuse] error" in problem and "conv_1" not in problem
    # expect_fallback says nothing about kept ops
    (problem,) = contained_failures([FALLBACK, KEPT], markers(expect_fallback=mark))
    assert "[lower] kept" in problem


def test_a_mark_without_patterns_tolerates_its_kind():
    mark = pytest.mark.expect_kept.mark
    assert contained_failures([KEPT, KEPT], markers(expect_kept=mark)) == []


def test_a_mark_is_stale_when_nothing_of_its_kind_happened():
    both = markers(expect_kept=pytest.mark.expect_kept.mark,
                   expect_fallback=pytest.mark.expect_fallback.mark)
    (problem,) = contained_failures([KEPT], both)
    assert "marked expect_fallback but no such decision was recorded" in problem


def test_repeated_decisions_are_listed_once_with_a_count():
    (problem,) = contained_failures([FALLBACK] * 3, markers())
    assert problem.count("RuntimeError: boom") == 1 and "(x3)" in problem


@pytest.mark.expect_fallback(r"^capture: seen by the watch$")
def test_every_report_is_watched(no_silent_fallback):
    """Any Report, wherever it is made, records through the watch (this test's own
    teardown would fail it as a stale mark otherwise)."""
    Report().record("capture", "-", "-", "fallback", "seen by the watch")
    assert [d.reason for d in no_silent_fallback] == ["seen by the watch"]


def test_only_the_decisions_a_test_checked_pass_the_watch(no_silent_fallback):
    """``expect_decisions`` (for draws that lead to a watched decision on some CPUs only)
    lets through the objects it was given, not others that read the same."""
    rep = Report()
    rep.record("lower", "-", "conv_3", "kept", "checked by the test")
    rep.record("lower", "-", "conv_3", "kept", "checked by the test")
    first, again = rep.decisions
    assert first == again and first is not again
    expect_decisions([first])
    assert [d is again for d in not_expected(no_silent_fallback)] == [True]
    expect_decisions([again])  # or this test's own teardown fails it
    assert not_expected(no_silent_fallback) == []
