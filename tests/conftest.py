"""Shared test set-up: hypothesis profiles and the after-every-pass verifier."""
import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=250, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def verify_every_pass(monkeypatch):
    """graph.lint() + fake-tensor re-propagation (shapes, dtypes, strides) after every
    pass, in every test: ``Options.verify``'s default reads FUSEPASS_VERIFY."""
    monkeypatch.setenv("FUSEPASS_VERIFY", "1")
