"""fusepass.save / fusepass.load and the compile cache (issue 17).

Expected values: a loaded model must equal, bit for bit, the in-process optimized module
on the same machine (same kernels on the same weights); the in-process module itself is
held to eager by the rest of the suite, and here to eager within the dtype's tolerance.
Subprocesses run with the suite's FUSEPASS_VERIFY=1 (inherited) and fail on any
``error``/``fallback`` decision, since the report watch does not reach into them.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fusepass
from bench import zoo
from bench.models import MODELS
from fusepass import deploy, serialize
from fusepass.cache import SUFFIX, evict
from tests.util import assert_close, histogram, tiny_bert

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_py(code: str, *args, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return _result(p.returncode, p.stdout, p.stderr)


def _result(rc, out, err):
    assert rc == 0, f"subprocess failed ({rc}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def bitwise_equal(a, b) -> bool:
    a, b = flat(a), flat(b)
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def resnet():
    return zoo.build("resnet18"), zoo.example_input("resnet18", 1, 64)


def bert():
    return tiny_bert(), torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def tiny():
    return MODELS["tiny"].build(0), MODELS["tiny"].inputs(1)[0]


def optimized(model, x, **opts):
    with torch.no_grad():
        return fusepass.optimize(model, [x], **opts)


# ------------------------------------------------------------------------ save / load
LOAD_AND_RUN = """
import json, sys, torch
import transformers.modeling_outputs  # the ModelOutput types BERT returns (pytree-registered)
import fusepass
from tests.util import histogram
path, inputs, outputs = sys.argv[1:4]
m = fusepass.load(path)
out = m(torch.load(inputs))
torch.save(out, outputs)
bad = [str(d) for d in m.fusepass_report.decisions if d.action in ("error", "fallback")]
assert not bad, bad
print(json.dumps({"histogram": dict(histogram(m.graph_module)), "kernels": m.fusepass_report.kernels,
                  "type": type(out).__name__}))
"""


@pytest.mark.parametrize("build", [resnet, bert], ids=["resnet18", "tiny_bert"])
def test_save_load_in_a_fresh_process_is_bitwise_the_in_process_module(build, tmp_path):
    model, x = build()
    ref = optimized(model, x)
    with torch.no_grad():
        want, eager = ref(x), model(x)
    assert_close(want, eager)
    path = tmp_path / "model.fusepass"
    report = fusepass.save(model, path, [x])
    assert report.counts  # something was folded or fused
    torch.save(x, tmp_path / "x.pt")
    got_info = run_py(LOAD_AND_RUN, path, tmp_path / "x.pt", tmp_path / "y.pt")
    got = torch.load(tmp_path / "y.pt", weights_only=False)
    assert type(got).__name__ == type(want).__name__ == got_info["type"]
    assert bitwise_equal(got, want)
    assert got_info["histogram"] == dict(histogram(ref))
    assert got_info["kernels"] == ref.fusepass_report.kernels


def test_loaded_report_says_what_was_fused_and_what_was_lowered(tmp_path):
    model, x = resnet()
    ref = optimized(model, x)
    fusepass.save(model, tmp_path / "m.fusepass", [x])
    m = fusepass.load(tmp_path / "m.fusepass")
    r = m.fusepass_report
    assert r.counts == ref.fusepass_report.counts  # fold/fuse rows, from the save
    assert r.kernels == ref.fusepass_report.kernels  # kernels, from this load
    assert dict(histogram(m.graph_module)) == dict(histogram(ref))
    assert any(d.stage == "load" for d in r.decisions)
    with torch.no_grad():
        assert bitwise_equal(m(x), ref(x))
    meta = m.fusepass_meta
    assert meta["torch_version"] == torch.__version__ and meta["inputs"][0][0] == list(x.shape)


class _QNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.fc(torch.relu(self.c2(y) + y).mean((2, 3)))


def int8_model():
    """A PT2E-converted INT8 graph (torchao's X86InductorQuantizer, reduce_range for any CPU)."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    torch.manual_seed(0)
    model, x = _QNet().eval(), torch.randn(2, 3, 16, 16)
    q = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=True))
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), q)
    prepared(x)
    return convert_pt2e(prepared), x


@pytest.mark.parametrize("build", [int8_model, lambda: (tiny()[0].to(torch.bfloat16),
                                                        tiny()[1].to(torch.bfloat16))],
                         ids=["int8_pt2e", "bf16"])
def test_int8_and_bf16_models_save_and_load(build, tmp_path):
    model, x = build()
    ref = optimized(model, x)
    fusepass.save(model, tmp_path / "m.fusepass", [x])
    m = fusepass.load(tmp_path / "m.fusepass")
    with torch.no_grad():
        assert bitwise_equal(m(x), ref(x))
    assert histogram(m.graph_module) == histogram(ref)
    assert m.fusepass_report.kernels == ref.fusepass_report.kernels
    if x.dtype == torch.float32:  # the int8 graph: its convs and linear on int8 kernels
        assert sum(v for k, v in histogram(ref).items() if k.startswith("onednn.q")) == 3


def test_saved_file_is_no_larger_than_the_state_dict(tmp_path):
    model, x = resnet()
    fusepass.save(model, tmp_path / "m.fusepass", [x])
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert os.path.getsize(tmp_path / "m.fusepass") <= 1.1 * os.path.getsize(tmp_path / "sd.pt")


def test_load_can_lower_for_another_target(tmp_path):
    model, x = tiny()
    fusepass.save(model, tmp_path / "m.fusepass", [x])
    m = fusepass.load(tmp_path / "m.fusepass", lowering="reference")
    assert not any(k.startswith("mkldnn") for k in histogram(m.graph_module))
    with torch.no_grad():
        assert_close(m(x), model(x))


class _TwoInTwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x, z):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return {"logits": self.fc(y) + z, "features": [y, y * 2]}


def test_several_inputs_and_a_dict_output(tmp_path):
    torch.manual_seed(0)
    model, x, z = _TwoInTwoOut().eval(), torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    with torch.no_grad():
        ref = fusepass.optimize(model, [x, z])
        want = ref(x, z)
    fusepass.save(model, tmp_path / "m.fusepass", [x, z])
    got = fusepass.load(tmp_path / "m.fusepass")(x, z)
    assert isinstance(got, dict) and set(got) == {"logits", "features"}
    assert isinstance(got["features"], list) and bitwise_equal(got, want)


def test_save_refuses_a_training_model(tmp_path):
    model, x = tiny()
    with pytest.raises(fusepass.SaveError, match="training mode"):
        fusepass.save(model.train(), tmp_path / "m.fusepass", [x])
    with pytest.raises(fusepass.SaveError, match="not tensors"):
        fusepass.save(model.eval(), tmp_path / "m.fusepass", [x, 3])


# ------------------------------------------------------------------ bad files, bad inputs
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, x = tiny()
    path = tmp_path_factory.mktemp("saved") / "tiny.fusepass"
    os.environ["FUSEPASS_VERIFY"] = "1"  # module scope: before the autouse fixture sets it
    try:
        fusepass.save(model, path, [x])
    finally:
        del os.environ["FUSEPASS_VERIFY"]
    return path, x


def rewrite(src, dst, edit, redigest=True):
    """The file ``src`` with ``edit(obj)`` applied, written to ``dst``; with a fresh digest
    (what a deliberate edit would do), so the check under test is the one that fires."""
    obj = torch.load(src, weights_only=True)
    edit(obj)
    if redigest:
        obj["digest"] = deploy.digest_of(obj)
    torch.save(obj, dst)
    return dst


def edit_meta(**kw):
    def edit(obj):
        meta = json.loads(obj["meta"])
        meta.update(kw)
        obj["meta"] = json.dumps(meta)
    return edit


def edit_graph(old, new):
    def edit(obj):
        assert old in obj["graph"]
        obj["graph"] = obj["graph"].replace(old, new, 1)
    return edit


def test_a_good_file_loads(saved):
    path, x = saved
    m = fusepass.load(path)
    with torch.no_grad():
        assert_close(m(x), tiny()[0](x))


def test_truncated_file(saved, tmp_path):
    data = saved[0].read_bytes()
    for cut in (len(data) // 2, 100, 0):
        (tmp_path / "t.fusepass").write_bytes(data[:cut])
        with pytest.raises(fusepass.FormatError, match="truncated or corrupted"):
            fusepass.load(tmp_path / "t.fusepass")


def test_corrupted_bytes(saved, tmp_path):
    data = bytearray(saved[0].read_bytes())
    for pos in (len(data) // 3, len(data) // 2, len(data) - 200):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        (tmp_path / "c.fusepass").write_bytes(bytes(bad))
        with pytest.raises(fusepass.FormatError):
            fusepass.load(tmp_path / "c.fusepass")


def test_modified_weights_fail_the_digest(saved, tmp_path):
    def edit(obj):
        t = next(iter(obj["tensors"].values()))
        t.view(-1)[0] += 1
    path = rewrite(saved[0], tmp_path / "w.fusepass", edit, redigest=False)
    with pytest.raises(fusepass.FormatError, match="digest"):
        fusepass.load(path)


def test_a_file_with_the_earlier_sha256_digest_still_loads(saved, tmp_path):
    """Files written before the digest became CRC-32 hold a sha256 of the same parts."""
    path, x = saved
    obj = torch.load(path, weights_only=True)
    assert obj["digest"].startswith("crc32:")
    want = fusepass.load(path)(x)

    def legacy(obj):
        obj["digest"] = hashlib.sha256(f"{obj['format']}\0{obj['version']}\0".encode()
                                       + obj["meta"].encode() + b"\0" + obj["graph"].encode()
                                       + b"\0" + b"".join(
            f"{n}\0{serialize.tensor_spec(obj['tensors'][n])}\0".encode()
            + deploy.tensor_bytes(obj["tensors"][n]).tobytes() for n in sorted(obj["tensors"]))).hexdigest()
    old = rewrite(path, tmp_path / "sha.fusepass", legacy, redigest=False)
    with torch.no_grad():
        assert bitwise_equal(fusepass.load(old)(x), want)
    bad = rewrite(old, tmp_path / "sha-bad.fusepass",
                  lambda o: next(iter(o["tensors"].values())).view(-1).__setitem__(0, 7.0),
                  redigest=False)
    with pytest.raises(fusepass.FormatError, match="digest"):
        fusepass.load(bad)
    odd = rewrite(path, tmp_path / "odd.fusepass", lambda o: o.update(digest="md5:abc"),
                  redigest=False)
    with pytest.raises(fusepass.FormatError, match="unknown digest"):
        fusepass.load(odd)


def test_a_loaded_model_never_writes_its_file(saved, tmp_path):
    """The tensors are memory-mapped copy-on-write: running the model, and writing into a
    loaded constant, leave the file's bytes as they were."""
    path, x = saved
    copy = tmp_path / "copy.fusepass"
    copy.write_bytes(path.read_bytes())
    before = hashlib.sha256(copy.read_bytes()).hexdigest()
    m = fusepass.load(copy)
    gm = m.graph_module
    with torch.no_grad():
        y = m(x)
        dense = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        dense = [t for t in dense if isinstance(t, torch.Tensor) and t.layout == torch.strided
                 and not t.is_mkldnn and t.is_floating_point()]
        assert dense, "no dense constant left to write into: the test would check nothing"
        for t in dense:
            t.add_(1.0)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == before
    with torch.no_grad():
        assert bitwise_equal(fusepass.load(copy)(x), y)


def test_not_a_fusepass_file(tmp_path):
    torch.save({"weights": torch.ones(3)}, tmp_path / "sd.pt")
    with pytest.raises(fusepass.FormatError, match="not a fusepass file"):
        fusepass.load(tmp_path / "sd.pt")
    (tmp_path / "junk").write_bytes(os.urandom(4096))
    with pytest.raises(fusepass.FormatError):
        fusepass.load(tmp_path / "junk")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['FUSEPASS_TEST_MARKER']}",))


def test_a_pickled_payload_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("FUSEPASS_TEST_MARKER", str(marker))
    torch.save({"format": "fusepass", "version": 1, "meta": _Payload()}, tmp_path / "evil.fusepass")
    with pytest.raises(fusepass.FormatError):
        fusepass.load(tmp_path / "evil.fusepass")
    assert not marker.exists()


def test_unknown_format_version(saved, tmp_path):
    path = rewrite(saved[0], tmp_path / "v.fusepass", lambda o: o.update(version=99))
    with pytest.raises(fusepass.VersionError, match="format version 99"):
        fusepass.load(path)


def test_torch_version_it_cannot_serve(saved, tmp_path):
    path = rewrite(saved[0], tmp_path / "t.fusepass", edit_meta(torch_version="2.99.0"))
    with pytest.raises(fusepass.VersionError, match="torch 2.99.0"):
        fusepass.load(path)
    # a patch release or another local build of the same minor is served
    major, minor = torch.__version__.split(".")[:2]
    path = rewrite(saved[0], tmp_path / "p.fusepass", edit_meta(torch_version=f"{major}.{minor}.9+abc"))
    fusepass.load(path)


def test_newer_fusepass_version(saved, tmp_path):
    path = rewrite(saved[0], tmp_path / "f.fusepass", edit_meta(fusepass_version="99.0.0"))
    with pytest.raises(fusepass.VersionError, match="newer than this fusepass"):
        fusepass.load(path)


def test_unknown_saved_option(saved, tmp_path):
    path = rewrite(saved[0], tmp_path / "o.fusepass",
                   edit_meta(options={"lowering": "onednn", "warp_drive": True}))
    with pytest.raises(fusepass.VersionError, match="warp_drive"):
        fusepass.load(path)


@pytest.mark.parametrize("name", ["aten.no_such_op.default", "os.system.default",
                                  "builtins.eval", "aten.__class__.default", "fusepass.conv.nope"])
def test_unknown_op_name(saved, tmp_path, name):
    path = rewrite(saved[0], tmp_path / "u.fusepass",
                   edit_graph('"target":"fusepass.conv.default"', f'"target":"{name}"'))
    with pytest.raises(fusepass.UnknownOpError):
        fusepass.load(path)


def test_an_input_spec_that_is_not_the_files_input_spec(saved, tmp_path):
    def edit(obj):
        g = json.loads(obj["graph"])
        g["nodes"][0]["meta"]["val"]["t"][0][2] += 1
        obj["graph"] = json.dumps(g)
    path = rewrite(saved[0], tmp_path / "g.fusepass", edit)
    with pytest.raises(fusepass.FormatError, match="input specs disagree"):
        fusepass.load(path)


def _edit_first_conv_spec(obj):
    """The first conv's saved result spec made one row taller than the op computes."""
    g = json.loads(obj["graph"])
    n = next(n for n in g["nodes"] if n["target"] == "fusepass.conv.default")
    n["meta"]["val"]["t"][0][2] += 1
    obj["graph"] = json.dumps(g)


def test_a_graph_that_does_not_check(saved, tmp_path):
    # the saved specs are the loaded values; with verify they are checked against a fake
    # propagation of the graph (pipeline.verify), and a disagreement is the file's fault
    path = rewrite(saved[0], tmp_path / "g.fusepass", _edit_first_conv_spec)
    with pytest.raises(fusepass.FormatError, match="does not check on load"):
        fusepass.load(path, verify=True)


def test_a_constant_whose_spec_is_not_its_tensors(saved, tmp_path):
    def edit(obj):
        g = json.loads(obj["graph"])
        n = next(n for n in g["nodes"] if n["op"] == "get_attr")
        n["meta"]["val"]["t"][2] = "float64"
        obj["graph"] = json.dumps(g)
    path = rewrite(saved[0], tmp_path / "c.fusepass", edit)
    with pytest.raises(fusepass.FormatError, match="not its tensor's"):
        fusepass.load(path, verify=False)


@pytest.mark.parametrize("spec", [[[-1, 3], [3, 1], "float32", 0], [[2, 3], [1], "float32", 0],
                                  [[2, 3], [3, 1], "complex_thing", 0], [[2.5], [1], "float32", 0]])
def test_a_malformed_value_spec(saved, tmp_path, spec):
    def edit(obj):
        g = json.loads(obj["graph"])
        n = next(n for n in g["nodes"] if n["target"] == "fusepass.conv.default")
        n["meta"]["val"]["t"] = spec
        obj["graph"] = json.dumps(g)
    path = rewrite(saved[0], tmp_path / "s.fusepass", edit)
    with pytest.raises(fusepass.FormatError, match="tensor spec|dtype"):
        fusepass.load(path, verify=False)


def test_a_version_1_file_is_refused_with_the_reason(saved, tmp_path):
    # version 1 files re-derived their metas on load; this loader takes them as values
    path = rewrite(saved[0], tmp_path / "v1.fusepass", lambda o: o.update(version=1))
    with pytest.raises(fusepass.VersionError, match="format version 1; .* reads version 2"):
        fusepass.load(path)


def test_loaded_values_are_the_saved_graphs_specs(tmp_path):
    """Every node's meta after a read is a meta tensor with the shape, dtype and strides
    (size-1 dims included) of the in-process neutral graph's fake value: ResNet-18 is
    channels-last after propagate_layout, BERT has tuple-valued and view nodes."""
    from fusepass.options import Options
    from fusepass.report import Report
    for i, (model, x) in enumerate([resnet(), bert()]):
        gm, _ = deploy.neutral(model, [x], Options(), Report())
        want = {n.name: n.meta["val"] for n in gm.graph.nodes  # not the folds' dead constants
                if n.op != "output" and (n.users or n.op != "get_attr")}
        fusepass.save(model, tmp_path / f"{i}.fusepass", [x])
        got, _ = deploy.read(tmp_path / f"{i}.fusepass")
        seen = 0
        assert {n.name for n in got.graph.nodes if n.op != "output"} == set(want)
        for n in got.graph.nodes:
            if n.op == "output":
                continue
            w, g = flat(want[n.name]), flat(n.meta["val"])
            assert len(w) == len(g), n.name
            for a, b in zip(w, g):
                assert b.is_meta and not isinstance(b, torch._subclasses.FakeTensor)
                assert (b.shape, b.dtype, b.stride()) == (a.shape, a.dtype, a.stride()), n.name
                seen += 1
            if isinstance(want[n.name], (tuple, list)):
                assert type(n.meta["val"]) is type(want[n.name]), n.name
        assert seen >= len(want)
        if i == 0:  # the convs run channels-last: strides that only the file can say
            convs = [n for n in got.graph.nodes if n.target is torch.ops.fusepass.conv.default]
            assert convs and all(n.meta["val"].is_contiguous(memory_format=torch.channels_last)
                                 for n in convs)


ONLY_LOAD = """
import json, sys, torch
import fusepass
path, inputs = sys.argv[1:3]
assert "torch._dynamo" not in sys.modules  # importing fusepass does not import it
m = fusepass.load(path)
out = m(torch.load(inputs))
bad = [str(d) for d in m.fusepass_report.decisions if d.action in ("error", "fallback")]
assert not bad, bad
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "sympy": "sympy" in sys.modules,
                  "kernels": m.fusepass_report.kernels}))
"""


def test_a_process_that_only_loads_never_imports_dynamo(tmp_path, monkeypatch):
    """Structural: fusepass.load + a call make no FakeTensorMode (which imports
    torch._dynamo) and no symbolic shapes (sympy). Without verify, as a user loads;
    verify's fake propagation is the check that needs them."""
    model, x = resnet()
    fusepass.save(model, tmp_path / "m.fusepass", [x])
    torch.save(x, tmp_path / "x.pt")
    monkeypatch.setenv("FUSEPASS_VERIFY", "0")
    got = run_py(ONLY_LOAD, tmp_path / "m.fusepass", tmp_path / "x.pt")
    assert got["kernels"]  # it lowered to oneDNN kernels
    assert not got["dynamo"] and not got["sympy"]


CODE = "x=__import__('os').system('touch {}')"


def _smuggle_name(g, code):
    # a placeholder's name is a parameter of the generated forward: a default value there
    # would run when the GraphModule is built
    g["nodes"][0]["name"] = code + ",arg"


def _smuggle_kwarg(g, code):
    # a kwarg's key is written into the generated code as a keyword
    n = next(n for n in g["nodes"] if n["op"] == "call_function")
    n["kwargs"] = {"dict": [[code, 1]]}


@pytest.mark.parametrize("smuggle", [_smuggle_name, _smuggle_kwarg], ids=["name", "kwarg"])
def test_names_cannot_smuggle_code_into_the_generated_forward(saved, tmp_path, smuggle):
    marker = tmp_path / "ran"

    def edit(obj):
        g = json.loads(obj["graph"])
        smuggle(g, CODE.format(marker))
        obj["graph"] = json.dumps(g)
    path = rewrite(saved[0], tmp_path / "n.fusepass", edit)
    with pytest.raises(fusepass.FormatError, match="not a plain identifier"):
        fusepass.load(path)
    assert not marker.exists()


def test_inputs_that_do_not_match_the_saved_specs(saved):
    path, x = saved
    m = fusepass.load(path)
    with torch.no_grad():
        for bad, what in [((x[:, :, :16],), "saved for"), ((x.double(),), "saved for"),
                          ((x.to(memory_format=torch.channels_last),), "strides"),
                          ((x, x), "input"), ((3,), "tensor")]:
            with pytest.raises(fusepass.InputMismatchError, match=what):
                m(*bad)


# -------------------------------------------------------------------------- the cache
def cache_reasons(report):
    return [d.reason for d in report.decisions if d.stage == "cache"]


def entry_is_whole(path) -> bool:
    """A complete entry of this format whose digest matches its contents (it refers to
    the captured graph's constants, so it is read as a graph only with that graph)."""
    obj = torch.load(path, weights_only=True)
    return obj["format"] == deploy.FORMAT and deploy.digest_of(obj) == obj["digest"]


def mlp():
    """Nothing folds: every constant of the neutral graph is a captured weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    return model, torch.randn(4, 64)


def test_an_entry_refers_to_the_captured_weights_instead_of_storing_them(tmp_path):
    """A hit hashes each weight once: the key covers the captured weights, the entry does
    not store (and its digest does not hash) the ones the neutral stages left alone."""
    model, x = mlp()
    miss = optimized(model, x, cache_dir=str(tmp_path))
    entry, = tmp_path.glob("*" + SUFFIX)
    obj = torch.load(entry, weights_only=True)
    refs = json.loads(obj["meta"])["extra"]["captured"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(refs) == 4 and not obj["tensors"], (refs, list(obj["tensors"]))
    assert entry.stat().st_size < weights / 4
    hit = optimized(model, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache hit") for r in cache_reasons(hit.fusepass_report))
    assert histogram(hit) == histogram(miss)
    with torch.no_grad():
        assert bitwise_equal(hit(x), miss(x))
        assert_close(hit(x), model(x))


def test_an_entry_with_folded_weights_stores_them(tmp_path):
    """ResNet's BatchNorms fold into its convs: those weights are new, so stored."""
    model, x = resnet()
    optimized(model, x, cache_dir=str(tmp_path))
    entry, = tmp_path.glob("*" + SUFFIX)
    obj = torch.load(entry, weights_only=True)
    convs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert len(obj["tensors"]) >= 2 * convs  # folded weight and bias of each conv
    hit = optimized(model, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache hit") for r in cache_reasons(hit.fusepass_report))
    with torch.no_grad():
        assert_close(hit(x), model(x))


def test_a_changed_weight_misses_although_the_entry_refers_to_weights(tmp_path):
    """The referenced weights are the current captured ones, so an entry built from old
    weights must never be found for new ones: it is another key."""
    model, x = mlp()
    optimized(model, x, cache_dir=str(tmp_path))
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0  # in place: same tensor object, same names
    m = optimized(model, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache miss") for r in cache_reasons(m.fusepass_report))
    with torch.no_grad():
        assert_close(m(x), model(x))
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 2


def test_an_entry_that_refers_to_weights_is_no_model_file(tmp_path):
    model, x = mlp()
    optimized(model, x, cache_dir=str(tmp_path))
    entry, = tmp_path.glob("*" + SUFFIX)
    with pytest.raises(deploy.FormatError, match="captured graph"):
        fusepass.load(entry)


def test_load_generates_the_graphs_code_once(saved, monkeypatch):
    """The target stages each recompile and so does the PassManager after each: on a
    read graph (a _LazyGraphModule) only the last one generates code."""
    calls = []
    real = torch.fx.GraphModule.recompile

    def counting(self):
        calls.append(type(self).__name__)
        return real(self)

    path, x = saved
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", counting)
    m = fusepass.load(path)
    assert len(calls) == 1, calls
    with torch.no_grad():
        assert_close(m(x), tiny()[0](x))  # and the first call generates none
    assert len(calls) == 1, calls


@pytest.mark.expect_fallback(r"^prepack_weights: RuntimeError: halfway \(pass undone\)$")
def test_a_target_stage_failing_halfway_on_load_is_undone(saved, monkeypatch):
    """On load a failed stage is undone by reading the file's graph again and replaying
    the stages before it (no graph copy before every stage): the loaded graph is the one
    lowering made, unpacked, and computes the model."""
    import fusepass.pipeline as pipeline

    def halfway(gm, *, options, report):
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.users:
                n.replace_all_uses_with(next(iter(gm.graph.nodes)))
                break
        gm.recompile()
        raise RuntimeError("halfway")

    path, x = saved
    want = fusepass.load(path)
    monkeypatch.setattr(pipeline, "STAGES", [(n, halfway if n == "prepack_weights" else f)
                                             for n, f in pipeline.STAGES])
    m = fusepass.load(path)
    errors = m.fusepass_report.where(action="error")
    assert [e.stage for e in errors] == ["prepack_weights"], errors
    assert not m.fusepass_report.where(stage="prepack_weights", action="rewritten")
    assert want.fusepass_report.where(stage="prepack_weights", action="rewritten")
    assert histogram(m.graph_module) == histogram(want.graph_module)  # packing keeps ops
    with torch.no_grad():
        assert_close(m(x), tiny()[0](x))


def test_cache_hit_in_process_is_bitwise_the_miss(tmp_path):
    model, x = tiny()
    plain = optimized(model, x)
    first = optimized(model, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache miss") for r in cache_reasons(first.fusepass_report))
    second = optimized(model, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache hit") for r in cache_reasons(second.fusepass_report))
    assert second.fusepass_report.counts == plain.fusepass_report.counts
    with torch.no_grad():
        assert bitwise_equal(first(x), plain(x)) and bitwise_equal(second(x), plain(x))
    assert histogram(second) == histogram(plain)
    # explain goes through Dynamo: another captured graph than optimize's, its own entry
    fusepass.explain(model, x, cache_dir=str(tmp_path))
    report = fusepass.explain(model, x, cache_dir=str(tmp_path))
    assert any(d.action == "info" and d.reason.startswith("cache hit") for d in report.decisions)


def test_cache_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path))
    model, x = tiny()
    optimized(model, x)
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 1


def test_a_weight_change_is_never_served_stale(tmp_path):
    model, x = tiny()
    m = optimized(model, x, cache_dir=str(tmp_path))
    with torch.no_grad():
        before = m(x)
        model.conv1.weight.mul_(-1.5)  # in place: the runtime's watch rebuilds the variant
        after = m(x)
        want = model(x)
    assert not torch.equal(after, before)
    assert_close(after, want)
    compiled = m.__dict__["_fusepass"]
    reasons = [r for v in compiled.variants.values() for r in cache_reasons(v.report)]
    assert any(r.startswith("cache miss") for r in reasons), reasons
    # the same architecture with other weights, in a fresh compile: a miss, its own values
    other = MODELS["tiny"].build(seed=1)
    m2 = optimized(other, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache miss") for r in cache_reasons(m2.fusepass_report))
    with torch.no_grad():
        assert_close(m2(x), other(x))
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 3


def test_a_corrupt_entry_is_rebuilt_not_served(tmp_path):
    model, x = tiny()
    ref = optimized(model, x, cache_dir=str(tmp_path))
    entry, = tmp_path.glob("*" + SUFFIX)
    entry.write_bytes(entry.read_bytes()[:1000])
    m = optimized(model, x, cache_dir=str(tmp_path))
    assert any("unusable, rebuilt" in r for r in cache_reasons(m.fusepass_report))
    with torch.no_grad():
        assert bitwise_equal(m(x), ref(x))
    assert entry_is_whole(entry)  # rewritten
    m = optimized(model, x, cache_dir=str(tmp_path))
    assert any(r.startswith("cache hit") for r in cache_reasons(m.fusepass_report))


def test_an_entry_under_another_name_is_rebuilt(tmp_path):
    """An entry whose stored key is not its name (copied, renamed) is never served."""
    model, x = tiny()
    optimized(model, x, cache_dir=str(tmp_path))
    a, = tmp_path.glob("*" + SUFFIX)
    x2 = MODELS["tiny"].inputs(2)[0]
    optimized(model, x2, cache_dir=str(tmp_path))
    b, = set(tmp_path.glob("*" + SUFFIX)) - {a}
    b.write_bytes(a.read_bytes())
    m = optimized(model, x2, cache_dir=str(tmp_path))
    assert any("stored key" in r for r in cache_reasons(m.fusepass_report))
    with torch.no_grad():
        assert_close(m(x2), model(x2))


def test_the_cache_is_bounded(tmp_path, monkeypatch):
    model, _ = tiny()
    for batch in (1, 2, 3):
        optimized(model, MODELS["tiny"].inputs(batch)[0], cache_dir=str(tmp_path))
    entries = sorted(tmp_path.glob("*" + SUFFIX), key=os.path.getmtime)
    assert len(entries) == 3
    evict(str(tmp_path), keep=entries[-1], limit=os.path.getsize(entries[-1]))
    assert list(tmp_path.glob("*" + SUFFIX)) == [entries[-1]]


def test_cache_under_dynamic_shapes(tmp_path):
    """dynamic=True hands the backend sizes as numbers: their values key the entry."""
    from fusepass.backend import fusepass_backend
    model = MODELS["tiny"].build(0)

    def compile_and_run(batches):
        seen = []

        def backend(gm, example_inputs):  # a fresh identity: Dynamo compiles anew
            seen.append(fusepass_backend(gm, example_inputs, options={"cache_dir": str(tmp_path)}))
            return seen[-1]
        f = torch.compile(model, backend=backend, dynamic=True)
        with torch.no_grad():
            outs = [f(MODELS["tiny"].inputs(b)[0]) for b in batches]
        return outs, [r for c in seen for v in c.variants.values() for r in cache_reasons(v.report)]

    first, reasons = compile_and_run([1, 2])
    assert [r.split(":")[0] for r in reasons] == ["cache miss", "cache miss"]
    second, reasons = compile_and_run([1, 2])
    assert [r.split(":")[0] for r in reasons] == ["cache hit", "cache hit"]
    assert all(bitwise_equal(a, b) for a, b in zip(first, second))
    with torch.no_grad():
        assert_close(second[1], model(MODELS["tiny"].inputs(2)[0]))


COMPILE_WITH_CACHE = """
import json, sys, torch
from bench.models import MODELS
from fusepass.backend import fusepass_backend
from tests.util import histogram
cache, outputs = sys.argv[1:3]
seen = []
def backend(gm, example_inputs):  # backend="fusepass", keeping the Compiled for its report
    c = fusepass_backend(gm, example_inputs, options={"cache_dir": cache})
    seen.append(c)
    return c
model, x = MODELS["tiny"].build(0), MODELS["tiny"].inputs(1)[0]
with torch.no_grad():
    out = torch.compile(model, backend=backend)(x)
torch.save(out, outputs)
variants = [v for c in seen for v in c.variants.values()]
bad = [str(d) for v in variants for d in v.report.decisions if d.action in ("error", "fallback")]
assert not bad, bad
print(json.dumps({"cache": [d.reason.split(":")[0] for v in variants for d in v.report.decisions
                            if d.stage == "cache"],
                  "histogram": [dict(histogram(v.gm)) for v in variants]}))
"""


def test_cache_across_processes_concurrent_writers_then_a_hit(tmp_path):
    cache = tmp_path / "cache"
    model, x = tiny()
    with torch.no_grad():
        want = torch.compile(model, backend="fusepass")(x)
    # two processes compile the same model at once on a cold cache: both write the entry
    procs = [run_py(COMPILE_WITH_CACHE, cache, tmp_path / f"y{i}.pt", wait=False) for i in range(2)]
    cold = [_result(p.wait(), *p.communicate()) for p in procs]
    assert all(r["cache"] for r in cold)
    entries = list(cache.glob("*" + SUFFIX))
    assert len(entries) == 1 and not list(cache.glob(".tmp-*"))
    assert entry_is_whole(entries[0])  # a complete, valid entry
    warm = run_py(COMPILE_WITH_CACHE, cache, tmp_path / "y2.pt")
    assert warm["cache"] == ["cache hit"]
    assert warm["histogram"] == cold[0]["histogram"]
    # the hit gives what a compile gives, bit for bit: the processes' outputs agree; this
    # process is compared within tolerance, since the suite may have imported IPEX here
    # (tests/test_ipex.py, the IPEX env), which changes oneDNN's results on AVX-512 CPUs
    # (seen on Zen 5) while the fresh processes import no IPEX
    outs = [torch.load(tmp_path / f"y{i}.pt") for i in range(3)]
    assert all(bitwise_equal(o, outs[0]) for o in outs[1:])
    assert_close(outs[0], want)
