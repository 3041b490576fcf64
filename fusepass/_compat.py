"""Version shims so that one source tree runs on torch 2.8 (the IPEX env) and 2.13.

IPEX's last CPU release pins torch 2.8.x while the default env has 2.13; the few
differences between them are handled once here, each with a note of which side needs
it: by feature detection for APIs, by version where what differs is what tracing emits.
"""
from __future__ import annotations

import torch
from torch.torch_version import TorchVersion


def treespec_children(spec) -> list:
    """Child specs of a pytree TreeSpec: ``children()`` on 2.13 (where ``children_specs``
    is deprecated), only the ``children_specs`` attribute on 2.8."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


TRACES_BN_AS_LEGIT = TorchVersion(torch.__version__) < (2, 9)


def batch_norm_as_native(node):
    """torch 2.8 traces every BatchNorm as ``_native_batch_norm_legit_no_training`` (eval),
    ``_native_batch_norm_legit`` (train) or its ``.no_stats`` overload (no running stats);
    2.13 as ``native_batch_norm`` for all three. On 2.8 capture rewrites those forms, so
    that patterns and reports see the one spelling 2.13 gives: returns the
    ``native_batch_norm`` args for such a node, else None. Same outputs (y, save_mean,
    save_invstd) and the same in-place running-stat update in training mode. Not on 2.13,
    where a legit op in the graph is the user's own spelling (it has its pattern rows).
    Versions between 2.8 and 2.13 are unverified and treated like 2.13."""
    aten = torch.ops.aten
    if not TRACES_BN_AS_LEGIT or node.op != "call_function":
        return None
    if node.target is aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var, momentum, eps = node.args
        return (x, w, b, mean, var, False, momentum, eps)
    if node.target is aten._native_batch_norm_legit.default and len(node.args) == 8:
        return tuple(node.args)  # (x, w, b, running_mean, running_var, training, momentum, eps)
    if node.target is aten._native_batch_norm_legit.no_stats:  # track_running_stats=False
        x, w, b, training, momentum, eps = node.args
        return (x, w, b, None, None, training, momentum, eps)
    return None


def is_non_overlapping_and_dense(t) -> bool:
    """``torch._prims_common.is_non_overlapping_and_dense_or_false`` on 2.13 (False where a
    symbolic size leaves it undecided); 2.8 has only ``is_non_overlapping_and_dense``,
    which guards on symbolic sizes instead: the same answer on the static shapes 2.8's
    IPEX path compiles."""
    from torch import _prims_common as pc
    fn = getattr(pc, "is_non_overlapping_and_dense_or_false", None) or pc.is_non_overlapping_and_dense
    return fn(t)
