"""``GraphError``: the graph itself is wrong, and fusepass says so instead of optimizing it.

Everything else that goes wrong inside a pass is contained: the pass is undone and the
report records the error (the pipeline's habit: a bug of fusepass must not break a user's
model). A ``GraphError`` is not a bug of fusepass but of its input, where running on
would serve numbers nobody asked for — a quantization scale of 0 or NaN, for one, which
eager runs without complaint and turns into infinities. The pipeline and the runtime let
it through to the caller (under ``torch.compile`` Dynamo wraps it in its
``BackendCompilerFailed``, message kept).
"""


class GraphError(ValueError):
    """The input graph is invalid; the message names the node and what is wrong."""
