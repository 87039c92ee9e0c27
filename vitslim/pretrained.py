"""timm models by name with their weights: timm's pretrained ones (offline when the hub is unreachable) or local
timm/DeiT checkpoints, with one-line errors."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from unittest import mock

import huggingface_hub.constants
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from . import digits  # noqa: F401 - registers the tiny model of the embedded data with timm
from .errors import UserError


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a timm/DeiT checkpoint (.pth/.pt with 'model'/'state_dict' or plain) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for unreadable files
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load timm/DeiT-format weights into a timm ViT, strictly, with a one-line error on mismatch."""
    state = read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:
        raise UserError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}") from None
    own = model.state_dict()
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    heads = [k for k in mismatched if k.split(".")[0] in ("head", "head_dist")]
    bad = [k for k in mismatched if k not in heads]
    if bad:
        raise UserError(f"checkpoint {path} does not fit the model: {bad[0]} has shape "
                        f"{tuple(state[bad[0]].shape)}, the model needs {tuple(own[bad[0]].shape)}")
    for k in heads:  # fine-tuning to another number of classes: the classifier starts fresh
        del state[k]
    if heads:
        print(f"note: {path}: classifier {heads} has another number of classes; it starts untrained",
              file=sys.stderr)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in heads]
    if missing or result.unexpected_keys:
        raise UserError(f"checkpoint {path} does not match the model: missing {missing[:4]}, "
                        f"unexpected {result.unexpected_keys[:4]}")


HUB_HOST = "huggingface.co"  # where timm's pretrained weights come from


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether timm's weight hub answers within timeout_s (a name lookup and a TCP connection)."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def create_model(name: str, pretrained: bool, checkpoint: str | None, checkpoint_flag: str = "--checkpoint",
                 **kwargs) -> nn.Module:
    """A timm model by name, with timm's pretrained weights or local ones; one-line errors that name the flag
    for local weights (checkpoint_flag). Without a network, only weights already cached are tried (offline), so
    a missing download fails at once instead of after the hub's retries."""
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r}; any timm model name is accepted (e.g. deit_small_patch16_224)")
    download = pretrained and checkpoint is None
    offline = contextlib.nullcontext()
    if download and not hub_reachable():
        offline = mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        with offline:
            model = timm.create_model(name, pretrained=download, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained:
            why = (str(e).splitlines()[0] if isinstance(offline, contextlib.nullcontext) else
                   f"no network ({HUB_HOST} unreachable) and they are not in the local cache")
            raise UserError(f"cannot get timm's pretrained weights for {name} ({why}); use {checkpoint_flag} PATH "
                            f"for local weights") from None
        raise
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model
