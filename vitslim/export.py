"""`python -m vitslim.export`: a saved slim model as an ONNX file or a torch.export program, checked against eager.

    python -m vitslim.export runs/deit_s_70/slim --format onnx -o deit_s_70.onnx [--fused] [--dynamic-batch]

ONNX goes through torch's dynamo exporter; with --fused the model is loaded as load_slim(..., fused=True) and
its graph holds one vitslim::ragged_attention_fwd per block, which vitslim_kernels.onnx translates into
per-head attention in standard ONNX ops; without it the graph is the plain PyTorch path. pt2 is
torch.export.save's program; vitslim.export.load_pt2 loads either kind (torch.export.load too, once the op is
registered: vitslim_kernels.ops.ragged_attention.ragged_attention_fwd_op() does that).
The written file is loaded back and run on random images of the model's input size, and compared with the
eager model (ONNX: onnxruntime where installed, else onnx's reference evaluator): the max error is printed,
and the command fails (status 1) above --tolerance.
"""
from __future__ import annotations

import os
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitslim_kernels.ops.ragged_attention import ragged_attention_fwd_op

from . import cli
from .cli import ArgumentParser, UserError
from .saving import atomic_write, load_slim

FORMATS = ("onnx", "pt2")
RAGGED_OP = "vitslim.ragged_attention_fwd"
MIN_OPSET = 18
# Warnings torch's own exporter and loader raise about themselves (seen on torch 2.11), not about the model.
_TORCH_NOISE = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "The given buffer is not writable")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vitslim.export", description=__doc__.splitlines()[0])
    p.add_argument("slim_dir", metavar="SLIM_DIR", help="a folder written by save_slim (config.json + "
                   "model.safetensors), e.g. the slim/ of a retrain run")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx: an ONNX model; pt2: a torch.export "
                   "program (torch.export.save)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write (its folder is created)")
    p.add_argument("--fused", action="store_true", help="export the ragged-attention op (load_slim(..., "
                   "fused=True)) instead of the plain PyTorch per-head path")
    p.add_argument("--dynamic-batch", action="store_true", help="the batch size is an input dimension of the "
                   "exported model (checked at batch 1 and at the traced batch + 1)")
    p.add_argument("--batch-size", type=cli.positive_int("--batch-size"), default=1,
                   help="batch of the exported model; with --dynamic-batch it is traced at max(2, this) (torch.export "
                   "specialises a size of 1) and checked at 1 and at the traced batch + 1")
    p.add_argument("--tolerance", type=cli.non_negative("--tolerance"), default=1e-4,
                   help="the check passes when max |exported - eager| <= TOL x max(1, max |eager|)")
    p.add_argument("--opset", type=cli.positive_int("--opset"), default=None,
                   help=f"ONNX opset, >= {MIN_OPSET} (default: the exporter's)")
    p.add_argument("--seed", type=cli.non_negative_int("--seed"), default=0, help="of the random check images")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def images(model: nn.Module, batch: int, seed: int) -> torch.Tensor:
    """Random float32 images of the model's input size: (batch, in_chans, H, W)."""
    arch = model.slim_arch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, arch.in_chans, *arch.img_size, generator=g)


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None


def count_ragged_ops(program: torch.export.ExportedProgram) -> int:
    """Nodes of the custom ragged-attention op in an exported program's graph."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith(RAGGED_OP))


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> int:
    """torch.export `model` on `example` and save the program to `path`; returns its ragged-op count."""
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
    atomic_write(path, lambda tmp: torch.export.save(program, tmp))
    return count_ragged_ops(program)


def _onnx_table() -> dict:
    try:
        from vitslim_kernels.onnx import translation_table
        return translation_table()
    except ImportError as e:
        raise UserError(f"--format onnx: {e}") from None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool,
                opset: int | None = None) -> int:
    """ONNX-export `model` (torch's dynamo exporter, our ops translated) to `path`; returns its ragged-op count."""
    table = _onnx_table()
    program = torch.onnx.export(model, (example,), dynamo=True, custom_translation_table=table,
                                dynamic_shapes=_dynamic_shapes(dynamic_batch), input_names=["images"],
                                output_names=["logits"], opset_version=opset, verbose=False)
    # external_data=False: one self-contained file (the temporary name would end up in a sidecar's reference)
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    return count_ragged_ops(program.exported_program)


@dataclass(frozen=True)
class Check:
    runtime: str          # what ran the exported model
    batch: int
    max_error: float      # max |exported - eager|
    scale: float          # max(1, max |eager|)
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance * self.scale  # also False for nan

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"check: {self.runtime}, batch {self.batch}: max |exported - eager| = {self.max_error:.3g} "
                f"(tolerance {self.tolerance:g} x {self.scale:.3g} = {self.tolerance * self.scale:.3g}): {verdict}")


def run_onnx(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Outputs of the ONNX model at `path` on `x`, and what ran it."""
    feed = x.numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator
        session = ReferenceEvaluator(onnx.load(str(path)))
        name = session.input_names[0]
        return torch.from_numpy(session.run(None, {name: feed})[0]), f"onnx reference evaluator {onnx.__version__}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: feed})[0]), f"onnxruntime {ort.__version__}"


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """torch.export.load a file written by `--format pt2`, fused or not (it registers our op first).

    Call .module() on the result for an nn.Module: images (B, in_chans, H, W) -> logits (B, num_classes).
    """
    try:
        ragged_attention_fwd_op()  # a fused program calls vitslim::ragged_attention_fwd; loading resolves it
    except ImportError:
        pass  # then only a plain program can load, and torch says so for a fused one
    return torch.export.load(str(path))


def run_pt2(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    return load_pt2(path).module()(x), f"torch.export.load (torch {torch.__version__})"


def check(model: nn.Module, path: Path, fmt: str, batch: int, seed: int, tolerance: float) -> Check:
    """Run the file at `path` and the eager `model` on the same random images; compare."""
    x = images(model, batch, seed)
    with torch.no_grad():
        expected = model(x)
        got, runtime = (run_onnx if fmt == "onnx" else run_pt2)(path, x)
    if got.shape != expected.shape:
        raise RuntimeError(f"the exported model returns shape {tuple(got.shape)}, eager {tuple(expected.shape)}")
    error = (got.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    return Check(runtime, batch, error, scale, tolerance)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder, out = Path(args.slim_dir), Path(args.output)
    if not folder.exists():
        raise UserError(f"SLIM_DIR {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"SLIM_DIR {folder} is not a folder; it must be one written by save_slim")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise UserError(f"--opset must be >= {MIN_OPSET} (torch's dynamo exporter builds opset {MIN_OPSET} and up), "
                        f"got {args.opset}")
    if out.is_dir():
        raise UserError(f"-o {out} is a folder; give the file to write")
    if args.fused:
        try:
            ragged_attention_fwd_op()
        except ImportError as e:
            raise UserError(f"--fused: {e}") from None
    model = load_slim(folder, device="cpu", fused=args.fused).float()  # deployed in float32, on CPU
    out.parent.mkdir(parents=True, exist_ok=True)

    traced = max(2, args.batch_size) if args.dynamic_batch else args.batch_size
    example = images(model, traced, args.seed)
    with warnings.catch_warnings():
        for message in _TORCH_NOISE:
            warnings.filterwarnings("ignore", message=message)
        if args.format == "onnx":
            ops = export_onnx(model, example, out, args.dynamic_batch, args.opset)
        else:
            ops = export_pt2(model, example, out, args.dynamic_batch)
        depth = len(model.blocks)
        if args.fused and ops != depth:
            raise RuntimeError(f"--fused: the exported graph holds {ops} {RAGGED_OP} nodes, expected one per "
                               f"block ({depth})")
        attention = (f"{ops} x vitslim::ragged_attention_fwd" + (" (as ONNX ops)" if args.format == "onnx" else "")
                     if args.fused else "plain PyTorch attention")
        batch = f"dynamic batch (traced at {traced})" if args.dynamic_batch else f"batch {traced}"
        print(f"wrote {out} ({args.format}, {batch}, {attention}, {out.stat().st_size / 2**20:.2f} MiB)")

        passed = True
        for i, b in enumerate([1, traced + 1] if args.dynamic_batch else [traced]):
            try:
                result = check(model, out, args.format, b, args.seed + 1 + i, args.tolerance)
            except Exception as e:  # whatever the runtime raises: the file does not run here
                if args.debug:
                    traceback.print_exc()
                print(f"check: FAILED at batch {b}: the exported model does not run: {_first_line(e)}")
                return cli.EXIT_FAILED
            print(result.line())
            passed = passed and result.passed
    return 0 if passed else cli.EXIT_FAILED


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


if __name__ == "__main__":
    cli.run(main)
