"""`python -m vitslim.export`: a saved slim model as an ONNX file or a torch.export program, checked against eager.

    python -m vitslim.export runs/deit_s_70/slim --format onnx -o deit_s_70.onnx [--fused] [--dynamic-batch]

ONNX goes through torch's dynamo exporter; with --fused the model is loaded as load_slim(..., fused=True) and
its graph holds one attention op per block (vitslim::ragged_attention_fwd; a Swin's vitslim::window_attention_fwd,
bias and shift mask included), which vitslim_kernels.onnx translates into per-head attention in standard ONNX ops; without it the graph is the plain PyTorch path. pt2 is
torch.export.save's program; vitslim.deploy.export.load_pt2 loads either kind (torch.export.load too, once
vitslim_kernels is imported: it defines the op, with or without Triton).
The written file is loaded back and run on random images of the model's input size, and compared with the
eager model (ONNX: onnxruntime where installed, else onnx's reference evaluator): the max error is printed,
and the command fails (status 1) above --tolerance.
"""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path

from ..deploy.export import (FORMATS, MIN_OPSET, TORCH_NOISE, check, export_onnx, export_pt2, images)
from ..errors import UserError
from ..families import family_of
from ..saving import load_slim
from . import common as cli
from .common import ArgumentParser


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vitslim.export", description=__doc__.splitlines()[0])
    p.add_argument("slim_dir", metavar="SLIM_DIR", help="a folder written by save_slim (config.json + "
                   "model.safetensors), e.g. the slim/ of a retrain run")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx: an ONNX model; pt2: a torch.export "
                   "program (torch.export.save)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write (its folder is created)")
    p.add_argument("--fused", action="store_true", help="export the attention op (load_slim(..., fused=True): "
                   "ragged attention, a Swin's window attention) instead of the plain PyTorch path")
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
    model = load_slim(folder, device="cpu", fused=args.fused).float()  # deployed in float32, on CPU
    family = family_of(model)
    out.parent.mkdir(parents=True, exist_ok=True)

    traced = max(2, args.batch_size) if args.dynamic_batch else args.batch_size
    example = images(model, traced, args.seed)
    with warnings.catch_warnings():
        for message in TORCH_NOISE:
            warnings.filterwarnings("ignore", message=message)
        if args.format == "onnx":
            ops = export_onnx(model, example, out, args.dynamic_batch, args.opset)
        else:
            ops = export_pt2(model, example, out, args.dynamic_batch)
        depth = len(family.blocks(model))
        if args.fused and ops != depth:
            raise RuntimeError(f"--fused: the exported graph holds {ops} {family.attention_op} nodes, expected one per "
                               f"block ({depth})")
        attention = (f"{ops} x {family.attention_op}" + (" (as ONNX ops)" if args.format == "onnx" else "")
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
