"""Fold add/sub/mul/div by a per-channel constant into the preceding conv/linear.

``conv -> *2 -> +1 -> /3`` becomes one conv: each op is an affine map of the output
channels (``a*y + d``) absorbed as ``W' = a*W``, ``b' = a*b + d`` (float64, cast back
once), applied to a fixpoint. A constant is a Python number, a 0-d tensor or a frozen
tensor that varies only along the output-channel dim. The rows are the ``fold.const.*``
rows of ``patterns/folding.py``; each decline (non-channel broadcast, enlarged output,
dtype promotion, shared output, integer result, non-finite constant, division by zero,
``c / y``) is reported with its reason. New weights are new constants
(``fusepass.rewrite.evaluate_constants``), so a parameter shared with another node is left as it was.

The BatchNorm rows run here too (unless ``fold_batchnorm`` is disabled): a BN that only
becomes adjacent to its conv once a constant between them folds (``conv -> *c -> BN``)
folds in the same fixpoint instead of being left behind by the earlier pass.
"""
from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

from fusepass.constfold import run_fold_rows


def fold_binary_constants(gm, *, options, report) -> PassResult:
    prefixes = ["fold.const."] + (["fold.bn"] if options.enabled("fold_batchnorm") else [])
    return run_fold_rows(gm, prefixes, "fold_binary_constants", options, report)
