"""The CPU-side benchmark tools: the roofline model (benchmarks/roofline.py) and the compiled-kernel table
(benchmarks/kernel_resources.py). Both compile Triton kernels for a stand-in GPU (vitslim_kernels.compile_only)."""
import json
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton.language.cdiv, InterpretedFunction) or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the interpreter compiles nothing", allow_module_level=True)

from benchmarks import kernel_resources, roofline  # noqa: E402


def _two_layer_step(batch: int) -> None:
    w1, w2 = torch.randn(48, 32), torch.randn(16, 48)
    x = torch.randn(batch, 32)
    torch.relu(x @ w1.t()) @ w2.t()


def test_roofline_counts_matmul_flops_and_bytes():
    ops = roofline.record(_two_layer_step, 5)
    mms = [o for o in ops if o.name == "mm"]
    assert [o.flops for o in mms] == [2 * 5 * 32 * 48, 2 * 5 * 48 * 16]
    assert mms[0].bytes == 4 * (5 * 32 + 48 * 32 + 5 * 48)  # reads x and w1, writes the (5, 48) product
    assert all(o.kind == "aten" for o in ops) and not any(o.name in ("t", "view") for o in ops)  # views are free


def test_roofline_extrapolates_exactly_in_the_batch():
    predicted = roofline.extrapolate(_two_layer_step, 9)
    recorded = roofline.record(_two_layer_step, 9)
    assert [(o.name, o.flops, o.bytes) for o in predicted] == [(o.name, o.flops, o.bytes) for o in recorded]


def test_roofline_counts_the_tiles_our_attention_kernel_executes():
    import vitslim_kernels

    def step(batch):
        qkv = torch.randn(batch, 197, 3 * 128, dtype=torch.bfloat16)
        q, k, v = qkv.split(128, -1)
        vitslim_kernels.ragged_attention(q, k, v, (64, 64), 0.125, implementation="triton")

    (op,) = [o for o in roofline.record(step, 2) if o.kind == "triton"]
    assert op.name == "ragged_attention_fwd_kernel"
    assert op.flops == 2 * 2 * 2 * 2 * 256 * 256 * 64  # 2 matmuls, B = 2, H = 2, N = 197 in 64-tiles, d = 64
    assert op.bytes == 3 * 2 * 197 * 128 * 2 + 2 * 197 * 128 * 2 + 2 * 2 * 197 * 4 + 3 * 2 * 4  # q k v, o, lse, table


def test_roofline_cli_refuses_bad_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        roofline.main(["--batch", "0"])
    assert e.value.code == 2 and "--batch must be a positive integer, got 0" in capsys.readouterr().err


def test_kernel_resources_writes_results_and_the_readme_table(tmp_path, monkeypatch):
    assert kernel_resources.main(["--targets", "sm_90", "--workloads", "direct_unaligned_bf16",
                                  "-o", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "kernel_resources.json").read_text())
    assert {r["kernel"] for r in results["kernels"]} == kernel_resources.WORKLOADS["direct_unaligned_bf16"].kernels
    assert all(r["registers"] > 0 and r["target"] == "sm_90" for r in results["kernels"])
    assert results["versions"]["triton"] == triton.__version__
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{kernel_resources.README_BEGIN}\nold\n{kernel_resources.README_END}\nrest\n")
    kernel_resources.write_readme_table(results, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "`ragged_attention_fwd_kernel`" in text and "| direct_unaligned_bf16 |" in text


def test_kernel_resources_cli_names_what_it_accepts(capsys):
    with pytest.raises(SystemExit) as e:
        kernel_resources.main(["--targets", "sm_75"])
    assert e.value.code == 2 and "unknown target 'sm_75'; accepted: sm_90, sm_80" in capsys.readouterr().err
