"""``lowering="ipex"`` / ``"auto"`` where IPEX cannot be imported: the onednn target runs,
and the report says so. Runs in every env: IPEX's absence is simulated (a ``None`` entry
in ``sys.modules`` makes both ``import`` and ``find_spec`` fail), and, where IPEX really
is absent (the default env), checked once more without simulation."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.util import assert_close, optimize

IPEX = "intel_extension_for_pytorch"


class ConvRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def no_ipex(monkeypatch):
    """IPEX unimportable for this test only (the ipex target's table rows are data and
    stay registered; ``ipex.load()`` is what fails)."""
    monkeypatch.setitem(sys.modules, IPEX, None)


def _check_onednn_fallback(lowering):
    torch.manual_seed(0)
    m, x = ConvRelu().eval(), torch.randn(2, 3, 8, 8)
    gm = optimize(m, [x], lowering=lowering)
    rep = gm.fusepass_report
    assert rep.kernels == {"mkldnn._convolution_pointwise": 1, "mkldnn._linear_pointwise": 1}, rep
    with torch.no_grad():
        assert_close(gm(x), m(x))
    return rep


@pytest.mark.expect_fallback(r"^lower: ipex target unavailable \(.*\); using onednn$")
def test_ipex_without_ipex_falls_back_to_onednn_reported(no_ipex):
    rep = _check_onednn_fallback("ipex")
    (d,) = rep.where(stage="lower", action="fallback")
    assert "ipex target unavailable" in d.reason and "using onednn" in d.reason, d
    assert rep.fell_back


def test_auto_without_ipex_chooses_onednn(no_ipex):
    rep = _check_onednn_fallback("auto")
    assert any("lowering='auto' chose 'onednn'" in d.reason for d in rep.where(stage="lower"))
    assert not rep.fell_back


@pytest.mark.expect_fallback(r"^lower: ipex target unavailable \(No module named "
                             r"'intel_extension_for_pytorch'\); using onednn$")
@pytest.mark.skipif(importlib.util.find_spec(IPEX) is not None,
                    reason="IPEX is installed here; covered by the simulated-absence tests")
def test_ipex_in_the_default_env_falls_back_to_onednn():
    rep = _check_onednn_fallback("ipex")
    (d,) = rep.where(stage="lower", action="fallback")
    assert "No module named 'intel_extension_for_pytorch'" in d.reason, d
