"""The state a run leaves behind and resumes from: checkpoint files, RNG states, and the model of a search.

A checkpoint is one torch file written atomically (vitslim.files), loaded with weights_only=True: model,
optimizer, scheduler, EMA and RNG states, the epoch and step, the log so far, and what the run was started with.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..families import family_named
from ..errors import UserError
from ..saving import cfg_from_plain
from ..searchable import make_searchable
from ..slim import set_pretrained_cfg

CHECKPOINT = "checkpoint.pt"
FORMAT = "vitslim-train"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # when a checkpoint records none


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)  # per-rank augmentation; the sampler shares one permutation


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path`, or the checkpoint.pt inside it when it is a run folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise UserError(f"{path} is a folder without a {CHECKPOINT}: give the {CHECKPOINT} of a vitslim run")
        return path / CHECKPOINT
    return path


def read_checkpoint(path: Path) -> dict:
    """A vitslim training checkpoint (checkpoint.pt of search or retrain); a run folder means its checkpoint.pt.
    Anything else is a one-line UserError that says what the file is not."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (a truncated file, another format, a pickle with code: torch's text misleads)
        raise UserError(f"{path} is not a vitslim checkpoint (corrupt, or another format)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a vitslim training checkpoint")
    return ckpt


def load_search(path: Path):
    """(the searchable model, its arch, the checkpoint) of a search checkpoint (checkpoint.pt or its run folder)."""
    ckpt = read_checkpoint(path)
    if ckpt.get("name") != "search":
        raise UserError(f"{path} is a {ckpt.get('name')!r} checkpoint; --searched takes the checkpoint.pt "
                        "of a vitslim.search run")
    family = family_named(ckpt.get("family", "vit"))  # searches before the family record were of ViTs
    arch = family.arch_from_dict(ckpt["arch"])
    model = make_searchable(family.build(arch), search=ckpt["search"])
    model.load_state_dict(ckpt["model"])
    set_pretrained_cfg(model, search_data_config(ckpt, arch))
    return model, arch, ckpt


def search_data_config(ckpt: dict, arch) -> dict:
    """The data config (timm's pretrained_cfg) the search trained with; for a checkpoint older than that record,
    the one its input size and mean/std give."""
    if ckpt.get("pretrained_cfg"):
        return cfg_from_plain(ckpt["pretrained_cfg"])
    mean, std = ckpt.get("mean_std", (IMAGENET_MEAN, IMAGENET_STD))
    return {"input_size": (3, *arch.img_size), "mean": tuple(mean), "std": tuple(std),
            "num_classes": arch.num_classes}


def dense_weights(ckpt: dict, searched: Path) -> Path:
    """The dense weights a search started from: dense.safetensors beside its checkpoint (a run folder moved or
    copied keeps it there), else the path the search recorded."""
    beside = searched.parent / "dense.safetensors"
    return beside if beside.is_file() else Path(ckpt.get("dense_weights", ""))


def dense_model(arch, ckpt: dict, searched: Path):
    """The dense model a search started from (its saved weights when present)."""
    model = family_named(arch.family).build(arch)
    weights = dense_weights(ckpt, searched)
    if weights.is_file():
        model.load_state_dict(load_file(str(weights)))
    set_pretrained_cfg(model, search_data_config(ckpt, arch))
    return model
