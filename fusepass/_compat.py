"""Version shims so that one source tree runs on torch 2.8 (the IPEX env) and 2.13.

IPEX's last CPU release pins torch 2.8.x while the default env has 2.13; the few APIs
that differ between them are spelled once here, each guarded by feature detection
rather than version numbers, with a note of which side needs it.
"""
from __future__ import annotations


def treespec_children(spec) -> list:
    """Child specs of a pytree TreeSpec: ``children()`` on 2.13 (where ``children_specs``
    is deprecated), only the ``children_specs`` attribute on 2.8."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)
