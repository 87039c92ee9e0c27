"""Deployment formats of a slim model: an ONNX file or a torch.export program, and a check that the written file
runs and matches the eager model.

ONNX goes through torch's dynamo exporter; a model loaded with load_slim(..., fused=True) holds one attention op
per block (vitslim::ragged_attention_fwd, a Swin's vitslim::window_attention_fwd), which vitslim_kernels.onnx
translates into per-head attention in standard ONNX ops; otherwise the graph is the plain PyTorch path. pt2 is torch.export.save's program; `load_pt2` loads
either kind (torch.export.load too, once vitslim_kernels is imported: it defines the op, Triton or not). The command is `python -m vitslim.export` (vitslim.cli.export).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import vitslim_kernels.ops.ragged_attention  # noqa: F401 - defines the op a fused .pt2 calls (load_pt2)
import vitslim_kernels.ops.window_attention  # noqa: F401 - and a fused Swin's

from ..files import atomic_write
from ..errors import UserError

FORMATS = ("onnx", "pt2")
ATTENTION_OPS = ("vitslim.ragged_attention_fwd", "vitslim.window_attention_fwd")  # what a fused graph holds
MIN_OPSET = 18
# Warnings torch's own exporter and loader raise about themselves (seen on torch 2.11), not about the model.
TORCH_NOISE = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "The given buffer is not writable")


def images(model: nn.Module, batch: int, seed: int) -> torch.Tensor:
    """Random float32 images of the model's input size: (batch, in_chans, H, W)."""
    arch = model.slim_arch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, arch.in_chans, *arch.img_size, generator=g)


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None


def count_attention_ops(program: torch.export.ExportedProgram) -> int:
    """Nodes of the custom attention ops (ATTENTION_OPS) in an exported program's graph."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith(ATTENTION_OPS))


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> int:
    """torch.export `model` on `example` and save the program to `path`; returns its attention-op count."""
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
    atomic_write(path, lambda tmp: torch.export.save(program, tmp))
    return count_attention_ops(program)


def _onnx_table() -> dict:
    try:
        from vitslim_kernels.onnx import translation_table  # optional: needs onnxscript (vitslim[export])
        return translation_table()
    except ImportError as e:
        raise UserError(f"--format onnx: {e}") from None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool,
                opset: int | None = None) -> int:
    """ONNX-export `model` (torch's dynamo exporter, our ops translated) to `path`; returns its attention-op count."""
    table = _onnx_table()
    program = torch.onnx.export(model, (example,), dynamo=True, custom_translation_table=table,
                                dynamic_shapes=_dynamic_shapes(dynamic_batch), input_names=["images"],
                                output_names=["logits"], opset_version=opset, verbose=False)
    # external_data=False: one self-contained file (the temporary name would end up in a sidecar's reference)
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    return count_attention_ops(program.exported_program)


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
        import onnxruntime as ort  # optional (vitslim[export])
    except ImportError:
        import onnx  # optional (vitslim[export])
        from onnx.reference import ReferenceEvaluator  # optional (vitslim[export])
        session = ReferenceEvaluator(onnx.load(str(path)))
        name = session.input_names[0]
        return torch.from_numpy(session.run(None, {name: feed})[0]), f"onnx reference evaluator {onnx.__version__}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: feed})[0]), f"onnxruntime {ort.__version__}"


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """torch.export.load a file written by `--format pt2`, fused or not (a fused program calls
    vitslim::ragged_attention_fwd, defined by this module's import of its op, with or without Triton).

    Call .module() on the result for an nn.Module: images (B, in_chans, H, W) -> logits (B, num_classes).
    """
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


