"""The pattern engine: match a table row's pattern graph, guard it, replace it.

A row's pattern and replacement are plain functions over ATen/fusepass ops. The pattern
is traced once into a small graph whose placeholders are wildcards (they bind a node or
a literal; a placeholder used twice must bind the same thing, which is how
``x * sigmoid(x)`` is spelled). Matching starts at the pattern's output (the anchor) and
walks arguments; ``add``/``mul`` also try the swapped operand order.

Legality is decided before anything mutates, in this order:
  1. structure (silent when it fails: most nodes are not candidates),
  2. every interior node is used only inside the match and is not a graph output,
  3. the row's named guard (returns a reason to decline, or None).
A declined structural match is recorded with its reason; a replacement never bails out.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.fx as fx

from fusepass.ir import add_constant, erase_dead, full_args, infer_meta, is_output_value
from fusepass.patterns.table import Match, Rule

aten = torch.ops.aten
COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}

_GRAPHS: dict = {}


def pattern_graph(rule: Rule) -> fx.Graph:
    g = _GRAPHS.get(rule.name)
    if g is None or _GRAPHS.get((rule.name, "fn")) is not rule.pattern:
        g = _GRAPHS[rule.name] = trace_pattern(rule.pattern)
        _GRAPHS[(rule.name, "fn")] = rule.pattern
    return g


def trace_pattern(fn) -> fx.Graph:
    g = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(g)
    params = inspect.signature(fn).parameters
    proxies = [fx.Proxy(g.placeholder(p), tracer) for p in params]
    out = fn(*proxies)
    g.output(out.node)
    return g


def _anchor(g: fx.Graph) -> fx.Node:
    return next(n for n in g.nodes if n.op == "output").args[0]


def _match_arg(p, a, st) -> bool:
    if isinstance(p, fx.Node):
        return _match_node(p, a, st)
    if isinstance(p, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(p) == len(a) and all(
            _match_arg(x, y, st) for x, y in zip(p, a))
    return type(p) is type(a) and p == a if not isinstance(a, fx.Node) else False


def _match_node(p: fx.Node, a: Any, st) -> bool:
    bind, matched = st
    if p.op == "placeholder":
        if p.name in bind:
            b = bind[p.name]
            return b is a if isinstance(b, fx.Node) or isinstance(a, fx.Node) else b == a
        bind[p.name] = a
        return True
    if not isinstance(a, fx.Node) or a.op != "call_function" or a.target != p.target:
        return False
    if p in matched:
        return matched[p] is a
    if a in matched.values():
        return False
    matched[p] = a
    pargs, gargs = full_args(p), full_args(a)
    orders = [pargs]
    if p.target in COMMUTATIVE:
        orders.append([pargs[1], pargs[0], *pargs[2:]])
    for order in orders:
        saved = (dict(bind), dict(matched))
        if len(order) == len(gargs) and all(_match_arg(x, y, st) for x, y in zip(order, gargs)):
            return True
        bind.clear(); bind.update(saved[0]); matched.clear(); matched.update(saved[1])
    del matched[p]
    return False


def match_at(rule: Rule, gm: fx.GraphModule, node: fx.Node, lowerable=None) -> Optional[Match]:
    anchor = _anchor(pattern_graph(rule))
    bind, matched = {}, {}
    if not _match_node(anchor, node, (bind, matched)):
        return None
    m = Match(gm, node, list(matched.values()), bind)
    if lowerable is not None:
        m.lowerable = lambda post, scalars, other: lowerable(m, post, scalars, other)
    return m


def interior_reason(m: Match) -> Optional[str]:
    """Generic legality: interior nodes are used only inside the match."""
    inside = set(m.nodes)
    for n in m.nodes:
        if n is m.anchor:
            continue
        if is_output_value(n):
            return f"{n.name} is a graph output"
        outside = [u for u in n.users if u not in inside]
        if outside:
            return f"{n.name} has {len(n.users)} users"
    return None


def replace(m: Match, rule: Rule) -> fx.Node:
    g = m.gm.graph
    tracer = fx.proxy.GraphAppendingTracer(g)
    params = list(inspect.signature(rule.replacement).parameters)
    args = [fx.Proxy(m.bindings[p], tracer) if isinstance(m.bindings[p], fx.Node)
            else m.bindings[p] for p in params]
    before = set(g.nodes)
    try:
        with g.inserting_before(m.anchor):
            out = rule.replacement(*args)
        new_node = out.node if isinstance(out, fx.Proxy) else out
        new_node = evaluate_constants(m.gm, [n for n in g.nodes if n not in before], new_node)
        if "val" not in new_node.meta and "val" in m.anchor.meta:
            # a replacement computes the anchor's value: same shape, dtype and layout
            # (re-deriving it by fake dispatch cost ~10 ms a node; Options.verify re-checks it)
            new_node.meta["val"] = m.anchor.meta["val"]
        for n in g.nodes:
            if n not in before:
                n.meta.setdefault("stack_trace", m.anchor.meta.get("stack_trace"))
                if "val" not in n.meta:
                    infer_meta(m.gm, n)
    except Exception:  # leave the graph as it was: remove what this attempt inserted
        erase_dead(m.gm, [n for n in g.nodes if n not in before])
        raise
    m.anchor.replace_all_uses_with(new_node)
    erase_dead(m.gm, m.nodes)
    return new_node


def evaluate_constants(gm, new_nodes, result):
    """Run, on the real tensors, every expression a replacement built from constants
    only (folded weights spelled in ATen) and put its value in as a new constant: a
    fake-tensor meta pass over it would cost more than the math. The inputs are only
    read; a value that aliases one is cloned, so a user's parameter is never handed out
    as (or written through) a new weight. Returns ``result``, or its constant."""
    values, known, const = {}, {}, {}

    def walk(root, leaf, combine, memo, settled=lambda a: False):
        # iterative post-order: the expression may reach back through the whole graph
        # (a deep net's activations are no constants, but finding that out walks them)
        stack = [root]
        while stack:
            a = stack[-1]
            if a in memo:
                stack.pop()
                continue
            if a.op != "call_function" or not a.all_input_nodes:
                memo[a] = leaf(a)
            elif settled(a):  # one input decides it: the rest need no walk
                memo[a] = False
            else:
                todo = [i for i in a.all_input_nodes if i not in memo]
                if todo:
                    stack.extend(todo)
                    continue
                memo[a] = combine(a)
            stack.pop()
        return memo[root]

    def constant(root):  # a constant expression? Decided before anything is evaluated:
        # evaluating as it walked ran every constant sub-expression upstream of the node
        # (each int8 layer's dequantize(weight)) once per replacement: MobileNetV3's int8
        # compile spent 17 s in 2,160 dequantize_per_channel calls for 184 rewrites
        return walk(root, lambda a: a.op == "get_attr",
                    lambda a: all(const[i] for i in a.all_input_nodes), const,
                    lambda a: any(const.get(i) is False for i in a.all_input_nodes))

    def value(root):  # the value of a constant expression (a user-written one too), or None
        if not constant(root):
            return None
        return walk(root, lambda a: getattr(gm, a.target),
                    lambda a: a.target(*fx.node.map_arg(a.args, known.__getitem__),
                                       **fx.node.map_arg(a.kwargs, known.__getitem__)), known)

    with torch.no_grad():
        for n in new_nodes:
            if n.op == "call_function" and value(n) is not None:
                values[n] = known[n]
    for n, value in values.items():
        if not any(u not in values for u in n.users) and n is not result:
            continue
        inputs = _sources(n)
        ptrs = {getattr(gm, a.target).untyped_storage().data_ptr() for a in inputs}
        value = value.detach()
        if value.untyped_storage().data_ptr() in ptrs:
            value = value.clone()
        names = sorted({a.meta["fusepass_source"] for a in inputs if a.meta.get("fusepass_source")})
        c = add_constant(gm, value, "fold", before=n, source="folded(" + ", ".join(names) + ")")
        n.replace_all_uses_with(c)
        result = c if n is result else result
    erase_dead(gm, list(values))
    return result


def _sources(node) -> list:
    """The get_attr constants a constant expression reads."""
    seen, out, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            out += [n] if n.op == "get_attr" else []
            stack.extend(n.all_input_nodes)
    return out


def apply_rules(gm: fx.GraphModule, rules, report, stage: str, max_rounds: int = 8,
                lowerable=None) -> bool:
    """Apply rules to a fixpoint; record rewrites and (surviving) declines.
    ``lowerable(match, post, scalars, other) -> reason | None`` answers the rows'
    lowerable guard (the fuse pass passes the chosen target's lowering table)."""
    changed_any = False
    declines = {}  # (rule, anchor) -> reason; dropped if the anchor is rewritten later
    for _ in range(max_rounds):
        changed = False
        for rule in rules:
            anchor_target = _anchor(pattern_graph(rule)).target
            for node in list(gm.graph.nodes):
                if node.graph is not gm.graph or node.op != "call_function" or node.target != anchor_target:
                    continue
                m = match_at(rule, gm, node, lowerable)
                if m is None:
                    continue
                if rule.when is not None and not rule.when(m):
                    continue
                reason = interior_reason(m) or rule.guard(m)
                if reason:
                    declines[(rule.name, node)] = reason
                    continue
                name = node.name
                try:
                    new = replace(m, rule)
                except Exception as e:  # a bug in a row must not break the graph
                    report.record(stage, rule.name, name, "error", f"{type(e).__name__}: {e}")
                    continue
                report.record(stage, rule.name, name, "rewritten", f"-> {new.name}")
                changed = changed_any = True
        if not changed:
            break
    live = set(gm.graph.nodes)
    for (rule, node), reason in declines.items():
        if node in live:
            report.record(stage, rule, node.name, "declined", reason)
    return changed_any
