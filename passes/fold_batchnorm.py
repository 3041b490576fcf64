"""Fold eval-mode BatchNorm into the preceding conv/linear: ``W' = W*s``,
``b' = (b - mean)*s + beta`` with ``s = gamma/sqrt(var + eps)``, computed in float64.

Conv+BN is the most common pair in inference convnets; once folded, the conv can take
the activation after it as a post-op, and no BatchNorm runs at all. The rows are the
``fold.bn*`` rows of ``patterns/folding.py`` (ATen ``native_batch_norm`` and
``_native_batch_norm_legit_no_training``, after conv 1d/2d/3d, grouped, transposed, or a
2-d linear); declines (training mode, no running stats, shared conv output, ...) are
reported by the rows' guards. New weights are new constants
(``fusepass.rewrite.evaluate_constants``).
"""
from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

from fusepass.constfold import run_fold_rows


def fold_batchnorm(gm, *, options, report) -> PassResult:
    return run_fold_rows(gm, ["fold.bn"], "fold_batchnorm", options, report)
