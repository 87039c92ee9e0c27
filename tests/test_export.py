"""python -m vitslim.export: ONNX and torch.export files that run and match eager; fused graphs carry our op."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitslim
import vitslim_kernels
from vitslim.cli import common as cli, export
from vitslim.deploy import export as deploy

from .test_slim import _manual_plan
from .tiny_models import make_vit, randomize_gates, searchable_copy

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 3  # tiny_models.TINY


def _searched(name, **overrides):
    model = searchable_copy(make_vit(name, dtype=torch.float32, **overrides))
    randomize_gates(model)
    return model


def _zero_width_plan_model():
    # Zero-width heads, a block with no head and no MLP unit, and a last block that keeps only the two prefix
    # tokens of a distilled DeiT (the plan of test_slim's zero-width test).
    dense = make_vit("deit_small_distilled_patch16_224", dtype=torch.float32)
    heads = [[list(range(0, 16, 3)), [], [5]], [[], [], []], [[1, 2, 3], list(range(16)), [0]]]
    mlp = [list(range(0, 192, 7)), [], [4, 9]]
    tokens = [list(range(16)), [1, 5, 6, 11], []]
    return vitslim.slim(dense, _manual_plan(dense, heads, mlp, tokens))


def _family(name):
    if name == "zero_width":
        return _zero_width_plan_model()
    timm_name, overrides, fold = {
        "deit": ("deit_small_patch16_224", {}, True),  # fold_gates: token scales stay in the graph
        "deit_distilled": ("deit_small_distilled_patch16_224", {}, False),
        "registers": ("vit_small_patch16_224", dict(reg_tokens=4), False),
    }[name]
    model = _searched(timm_name, **overrides)
    return vitslim.slim(model, vitslim.threshold(model, 0.5, 0.6, 0.7), fold_gates=fold)


FAMILIES = ("deit", "deit_distilled", "registers", "zero_width")


@pytest.fixture(scope="module")
def slim_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slim")
    return {name: vitslim.save_slim(_family(name), root / name) for name in FAMILIES}


def _run(argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.run(export.main, [str(a) for a in argv])
    return e.value.code


def _errors(text):
    """Every max error the command printed, and the tolerances it compared them with."""
    return [(float(err), float(tol)) for err, tol in
            re.findall(r"max \|exported - eager\| = (\S+) \(tolerance .* = (\S+)\): ok", text)]


def _needs_onnx(fmt):
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(module)


# Every family in both formats, fused and plain. Dynamic batch for most (checked at batch 1 and 3 after
# tracing at 2), one static export per format.
CASES = [(family, fmt, fused, family != "deit") for family in FAMILIES for fmt in ("onnx", "pt2")
         for fused in (False, True)]


@pytest.mark.parametrize("family, fmt, fused, dynamic", CASES)
def test_export_round_trip(slim_dirs, tmp_path, capsys, family, fmt, fused, dynamic):
    _needs_onnx(fmt)
    out = tmp_path / "sub" / f"model.{fmt}"  # the folder is created
    argv = [slim_dirs[family], "--format", fmt, "-o", out] + ["--fused"] * fused + ["--dynamic-batch"] * dynamic
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} ({fmt}, " in text
    assert (f"{DEPTH} x vitslim::ragged_attention_fwd" if fused else "plain PyTorch attention") in text
    errors = _errors(text)
    assert len(errors) == (2 if dynamic else 1), text
    assert all(err <= tol for err, tol in errors)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    if dynamic:
        assert "batch 1:" in text and "batch 3:" in text


def test_fused_export_graph_carries_the_op_and_plain_does_not(slim_dirs):
    # On a CPU, without TRITON_INTERPRET: dispatch would pick the reference, but the exported graph holds the op.
    x = deploy.images(vitslim.load_slim(slim_dirs["registers"]), 2, 0)
    for fused, count in ((True, DEPTH), (False, 0)):
        model = vitslim.load_slim(slim_dirs["registers"], fused=fused)
        assert deploy.count_attention_ops(torch.export.export(model, (x,))) == count
    eager_fused = vitslim.load_slim(slim_dirs["registers"], fused=True)
    # Two computations of one function in float32: fused on a CPU dispatches to the per-head reference, the plain
    # path is the bucketed SDPA (vitslim.layers.bucketed_attention): equal to float rounding, not bit for bit.
    torch.testing.assert_close(eager_fused(x), vitslim.load_slim(slim_dirs["registers"])(x), rtol=1e-5, atol=1e-6)


def test_fused_onnx_graph_is_standard_onnx(slim_dirs, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    assert _run([slim_dirs["deit"], "--format", "onnx", "--fused", "-o", out]) == 0
    graph = onnx.load(str(out))
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}, "a custom-domain node is left"
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("Softmax") == sum(w > 0 for b in vitslim.load_slim(slim_dirs["deit"]).blocks
                                       for w in b.attn.head_dims)  # one per kept head: none for zero-width ones


def test_onnx_check_without_onnxruntime_uses_the_reference_evaluator(slim_dirs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert _run([slim_dirs["zero_width"], "--format", "onnx", "--fused", "-o", tmp_path / "m.onnx"]) == 0
    text = capsys.readouterr().out
    assert "check: onnx reference evaluator" in text and len(_errors(text)) == 1


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_check_fails_on_a_model_that_differs(slim_dirs, tmp_path, fmt):
    _needs_onnx(fmt)
    model = vitslim.load_slim(slim_dirs["deit_distilled"])
    path = tmp_path / f"m.{fmt}"
    x = deploy.images(model, 1, 0)
    (deploy.export_onnx if fmt == "onnx" else deploy.export_pt2)(model, x, path, dynamic_batch=False)
    assert deploy.check(model, path, fmt, 1, seed=1, tolerance=1e-4).passed
    with torch.no_grad():
        model.head.bias[0] += 0.1  # distilled: the logits are the mean of two heads, so 0.05 off
    result = deploy.check(model, path, fmt, 1, seed=1, tolerance=1e-4)
    assert not result.passed and result.max_error > 1e-3 and "FAILED" in result.line()


def test_bad_input_is_one_line_and_status_2(slim_dirs, tmp_path, capsys):
    not_slim = tmp_path / "not_slim"
    not_slim.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out = tmp_path / "m.pt2"
    cases = [
        ([tmp_path / "nowhere", "--format", "pt2", "-o", out], "SLIM_DIR .*nowhere does not exist"),
        ([not_slim, "--format", "pt2", "-o", out], "config.json does not exist; a saved slim model is a folder"),
        ([a_file, "--format", "pt2", "-o", out], "is not a folder"),
        ([slim_dirs["deit"], "--format", "tflite", "-o", out], r"invalid choice: 'tflite' \(choose from"),
        ([slim_dirs["deit"], "--format", "pt2", "-o", tmp_path], "is a folder; give the file to write"),
        ([slim_dirs["deit"], "--format", "pt2"], "the following arguments are required: -o/--output"),
        ([slim_dirs["deit"], "--format", "onnx", "--opset", "17", "-o", out], "--opset must be >= 18 .* got 17"),
    ]
    for argv, message in cases:
        assert _run(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_missing_onnxscript_is_a_clear_error(slim_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert _run([slim_dirs["deit"], "--format", "onnx", "-o", tmp_path / "m.onnx"]) == 2
    assert "error: --format onnx: ONNX export needs onnx and onnxscript" in capsys.readouterr().err


def test_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vitslim.export", str(tmp_path / "nowhere"), "--format", "onnx",
                             "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: SLIM_DIR {tmp_path / 'nowhere'} does not exist"]


@pytest.mark.parametrize("triton_importable", [True, False])
def test_a_fused_pt2_loads_in_a_fresh_process(slim_dirs, tmp_path, triton_importable):
    """torch.export.load needs the op defined first; load_pt2 does that (a deployment script's only import). The op
    is defined with its CPU implementation wherever vitslim_kernels imports: in a process where triton cannot be
    imported too, the program loads and runs."""
    model = vitslim.load_slim(slim_dirs["registers"], fused=True)
    path = tmp_path / "m.pt2"
    deploy.export_pt2(model, deploy.images(model, 2, 0), path, dynamic_batch=triton_importable)
    x = deploy.images(model, 3 if triton_importable else 2, 1)
    torch.save(x, tmp_path / "x.pt")
    blocked = "" if triton_importable else "sys.modules['triton'] = None; "
    code = (f"import sys; {blocked}import torch; from vitslim.deploy.export import load_pt2; "
            "torch.save(load_pt2(sys.argv[1]).module()(torch.load(sys.argv[2], weights_only=True)), sys.argv[3]); "
            f"assert {triton_importable} or sys.modules['triton'] is None")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=ROOT)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), model(x), rtol=0, atol=1e-6)


class _RaggedOp(torch.nn.Module):
    def __init__(self, head_dims, scale):
        super().__init__()
        self.head_dims, self.scale = head_dims, scale

    def forward(self, q, k, v):
        return torch.ops.vitslim.ragged_attention_fwd(q, k, v, self.head_dims, self.scale)  # both outputs


def _lse_ref(q, k, head_dims, scale):
    rows, offset = [], 0
    for w in head_dims:
        if w > 0:
            cols = slice(offset, offset + w)
            rows.append(torch.logsumexp((q[..., cols] @ k[..., cols].transpose(-2, -1)) * scale, dim=-1))
        offset += w
    return torch.stack(rows, dim=1) if rows else q.new_zeros(q.shape[0], 0, q.shape[1])


@pytest.mark.parametrize("head_dims", [[0, 1, 17, 0, 5, 64], [0, 0]])
def test_onnx_translation_of_the_op_gives_o_and_lse(tmp_path, head_dims):
    # Both outputs, odd sizes, zero-width heads; checked against the reference computed in float64.
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from vitslim_kernels.onnx import ragged_attention_fwd_op, translation_table

    ragged_attention_fwd_op()  # registers the op
    B, N, D, scale = 3, 17, sum(head_dims), 0.3
    q, k, v = (torch.randn(B, N, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    program = torch.onnx.export(_RaggedOp(head_dims, scale).eval(), (q, k, v), dynamo=True, verbose=False,
                                custom_translation_table=translation_table())
    program.save(str(tmp_path / "op.onnx"))
    session = ort.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    o, lse = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (q, k, v))})
    assert o.shape == (B, N, D) and lse.shape == (B, sum(w > 0 for w in head_dims), N) and lse.dtype.name == "float32"
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected_o = vitslim_kernels.ragged_attention_ref(q64, k64, v64, head_dims, scale)
    torch.testing.assert_close(torch.from_numpy(o).double(), expected_o, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(lse).double(), _lse_ref(q64, k64, head_dims, scale), rtol=0, atol=1e-5)
