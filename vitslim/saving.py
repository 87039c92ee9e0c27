"""Save and load slim models: a folder with model.safetensors and config.json (arch + plan). No pickle.

(Deployment formats, ONNX and torch.export, are in vitslim.deploy.export.)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SlimFileError
from .files import atomic_write
from .implementations import SLIM as SLIM_IMPLEMENTATIONS
from .implementations import chosen
from .cuda_graphs import use_cuda_graphs
from .plan import SlimPlan
from .families import family_named
from .families.base import set_pretrained_cfg
from .slim import set_fused

FORMAT = "vitslim-slim"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def plain_cfg(cfg: dict) -> dict:
    """timm's pretrained_cfg as JSON: entries that are not plain data (a state dict, a callable) are left out."""
    def plain(v) -> bool:
        if v is None or isinstance(v, (bool, int, float, str)):
            return True
        if isinstance(v, (list, tuple)):
            return all(plain(e) for e in v)
        return isinstance(v, dict) and all(isinstance(k, str) and plain(e) for k, e in v.items())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if plain(v)}


def cfg_from_plain(cfg: dict) -> dict:
    # timm keeps sizes and mean/std as tuples; JSON gave lists back.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def save_slim(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` (from vitslim.slim or load_slim) to the folder `path`; returns the folder."""
    plan, arch = getattr(model, "slim_plan", None), getattr(model, "slim_arch", None)
    if plan is None or arch is None:
        raise ValueError(f"save_slim takes a model made by vitslim.slim or vitslim.load_slim; "
                         f"this {type(model).__name__} has no slim plan")
    # The head as it is now: timm's reset_classifier (fine-tuning) changes num_classes and maybe the pooling.
    arch = dataclasses.replace(arch, num_classes=int(model.num_classes), global_pool=model.global_pool)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    token_scale = any(k.endswith(".token_scale") for k in state)
    config = {"format": FORMAT, "version": FORMAT_VERSION, "arch": arch.to_dict(), "plan": plan.to_dict(),
              "token_scale": token_scale}
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        config["pretrained_cfg"] = plain_cfg(cfg)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
    return folder


def load_slim(path: str | os.PathLike, device: str | torch.device = "cpu", fused: bool = False,
              cuda_graphs: bool = False, *, implementation: str | None = None) -> nn.Module:
    """Load a slim model saved by save_slim; returns it in eval mode on `device`.

    implementation: as in vitslim.slim, "fused" (or fused=True) lets dispatch pick the fastest ragged-attention
    kernel; "reference" (default) is plain PyTorch.
    cuda_graphs: as in vitslim.slim, replay inference on CUDA inputs from CUDA graphs.
    """
    implementation = chosen(implementation, fused, SLIM_IMPLEMENTATIONS, "reference")
    folder = Path(path)
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise SlimFileError(f"{f} does not exist; a saved slim model is a folder with {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimFileError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SlimFileError(f"{config_file} is not a vitslim slim-model config (format must be {FORMAT!r})")
    if config.get("version") != FORMAT_VERSION:
        raise SlimFileError(f"{config_file} has version {config.get('version')!r}; accepted: {FORMAT_VERSION}")
    try:
        plan = SlimPlan.from_dict(config["plan"])
        family = family_named(plan.family)
        arch = family.arch_from_dict(config["arch"])
        model = family.build_slim(arch, plan, token_scale=bool(config["token_scale"]))
    except KeyError as e:
        raise SlimFileError(f"{config_file} has no {e.args[0]!r} entry (a config.json written by save_slim has "
                            f"'arch', 'plan' and 'token_scale')") from None
    except (TypeError, ValueError) as e:
        raise SlimFileError(f"{config_file} is inconsistent: {e}") from None
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error type for every kind of corruption
        raise SlimFileError(f"{weights_file} is not a readable safetensors file: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SlimFileError(f"{weights_file} does not match its plan: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise SlimFileError(f"{weights_file}: {key} has shape {tuple(value.shape)}, the plan needs "
                                f"{tuple(expected[key].shape)}")
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    model.to(dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
    model.load_state_dict(state, strict=True)
    set_fused(model, implementation == "fused")
    cfg = config.get("pretrained_cfg")
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise SlimFileError(f"{config_file}: pretrained_cfg must be a JSON object, got {type(cfg).__name__}")
        set_pretrained_cfg(model, cfg_from_plain(cfg))
    model = model.to(device).eval()
    return use_cuda_graphs(model) if cuda_graphs else model
