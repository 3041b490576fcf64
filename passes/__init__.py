"""fusepass.passes: one module per pass, each defining a function of the same name.

A pass is ``name(gm, *, options, report) -> PassResult``; the pipeline binds options and
report and runs them with torch.fx's PassManager, in the order of ``fusepass.pipeline``.
"""
