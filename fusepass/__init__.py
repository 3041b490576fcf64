"""fusepass: torch.fx passes that rewrite PyTorch inference graphs the way oneDNN wants.

    compiled = torch.compile(model, backend="fusepass")   # no import needed
    gm = fusepass.optimize(torch.fx.symbolic_trace(model), [x])
    print(fusepass.explain(model, x))
    qm = fusepass.quantize(model, calibration_batches)   # INT8 (PT2E), then compile qm
"""
from fusepass import ops  # noqa: F401  (registers the fusepass:: ops)
from fusepass.api import OptimizedGraphModule, explain, optimize
from fusepass.errors import GraphError
from fusepass.deploy import InputMismatchError, load, save
from fusepass.options import OptionError, Options
from fusepass.quantization import quantize
from fusepass.report import Decision, Report
from fusepass.serialize import DeployError, FormatError, SaveError, UnknownOpError, VersionError

__all__ = ["optimize", "explain", "quantize", "Options", "OptionError", "Report", "Decision",
           "OptimizedGraphModule", "save", "load", "DeployError", "SaveError", "FormatError",
           "VersionError", "UnknownOpError", "InputMismatchError", "GraphError"]
