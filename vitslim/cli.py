"""What the two commands share: argument types, one-line errors, distributed setup, model loading."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .arch import UnsupportedModelError
from .saving import SlimFileError
from .plan import PlanMismatchError
from .targets import TargetError
from .threshold import check_budget

EXIT_USAGE = 2
EXIT_FAILED = 1        # the run itself failed (e.g. the loss became NaN)
EXIT_INTERRUPTED = 130  # Ctrl-C, state saved


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits with status 2."""


# Errors that come from the user's input, wherever they are raised.
USER_ERRORS = (UserError, UnsupportedModelError, PlanMismatchError, SlimFileError, TargetError, FileNotFoundError)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's main: user errors become one line on stderr and exit status 2 (--debug: traceback)."""
    from .training import Interrupted, NonFiniteLossError

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    outcomes = ((USER_ERRORS, "error", EXIT_USAGE), (NonFiniteLossError, "error", EXIT_FAILED),
                (Interrupted, "stopped", EXIT_INTERRUPTED))
    threads = torch.get_num_threads()  # --threads sets them for the run: a caller in this process gets its own back
    try:
        code = main(args)
    except (*USER_ERRORS, NonFiniteLossError, Interrupted) as e:
        if debug:
            traceback.print_exc()
        prefix, code = next((p, c) for types, p, c in outcomes if isinstance(e, types))
        code = getattr(e, "exit_code", code)  # Interrupted: 130 (SIGINT) or 143 (SIGTERM)
        print(f"{prefix}: {e}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code or 0)


def budgets_type(text: str) -> tuple[float, float, float]:
    """'0.7' or '0.7,0.6,0.8' (attn, mlp, tokens) -> a triple of budgets in (0, 1]."""
    parts = text.split(",")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"budgets must be 'b' or 'attn,mlp,tokens', got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    try:
        return tuple(check_budget(n, v) for n, v in zip(("budget_attn", "budget_mlp", "budget_tokens"), values))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


budgets_type.range = "'b' or 'attn,mlp,tokens', each in (0, 1]"


def budget_type(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return check_budget(name, float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {text!r}") from None
    parse.range = "in (0, 1]"
    return parse


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None


def _number_where(name: str, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """A parser of numbers for which ok(value) holds (comparisons refuse nan); the error says `what` is wanted,
    and so does its `range` attribute (every numeric flag states its range: tests/test_cli.py checks)."""
    def parse(text: str) -> float:
        value = _number(name, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}")
        return value
    parse.range = what
    return parse


def non_negative(name: str) -> Callable[[str], float]:
    """A finite number >= 0."""
    return _number_where(name, lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")


def positive(name: str) -> Callable[[str], float]:
    """A finite number > 0."""
    return _number_where(name, lambda v: 0.0 < v < float("inf"), "a number > 0")


def unit_interval(name: str) -> Callable[[str], float]:
    """A number in [0, 1]."""
    return _number_where(name, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def fraction(name: str) -> Callable[[str], float]:
    """A number in [0, 1)."""
    return _number_where(name, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def _integer(name: str, minimum: int) -> Callable[[str], int]:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}")
        return value
    parse.range = what
    return parse


def positive_int(name: str) -> Callable[[str], int]:
    return _integer(name, 1)


def non_negative_int(name: str) -> Callable[[str], int]:
    return _integer(name, 0)


def threads_text(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit status 2 (argparse's own default status, kept)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (a random init differs per rank: seeds are)."""
        if self.enabled:
            with torch.no_grad():
                for t in module.state_dict().values():
                    dist.broadcast(t, src=0)


def setup_distributed(device: str | None = None) -> Distributed:
    """One process, or one per rank under torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked, but torch sees no CUDA GPU")
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device must be 'cuda' or 'cpu', got {device!r}")
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, dev)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a timm/DeiT checkpoint (.pth/.pt with 'model'/'state_dict' or plain) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
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
    from timm.models.vision_transformer import checkpoint_filter_fn

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
    import socket
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
    import contextlib
    from unittest import mock

    import timm

    from . import digits  # noqa: F401 - registers the tiny model of the embedded data with timm

    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r}; any timm model name is accepted (e.g. deit_small_patch16_224)")
    download = pretrained and checkpoint is None
    offline = contextlib.nullcontext()
    if download and not hub_reachable():
        import huggingface_hub.constants
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


def fingerprint(args, data_description: str, *names: str) -> dict:
    """What a resumed run must share with the run it continues beyond its recipe: the data and the named flags
    (vitslim.training.Trainer refuses a checkpoint whose fingerprint differs, naming what differs)."""
    return {"data": data_description, **{f"--{n.replace('_', '-')}": getattr(args, n) for n in names}}


def start_run(args, started: list[str], kind: str) -> tuple[Distributed, Callable[..., None], Path]:
    """Processes, the rank-0 printer, and the output folder of a command; refuses to overwrite a run.

    started: files under --output-dir whose presence means a run already began there.
    """
    from .training import seed_everything

    dist = setup_distributed(args.device)
    say = (lambda *a: print(*a, file=sys.stderr)) if dist.is_main else (lambda *a: None)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.fused and dist.device.type != "cuda":
        say("note: --fused needs a CUDA GPU; using the reference PyTorch path")
    seed_everything(args.seed, dist.rank)
    out = Path(args.output_dir)
    begun = any((out / name).exists() for name in started)
    if not args.resume and begun:
        raise UserError(f"{out} already holds a {kind} run: pass --resume to continue it, or another --output-dir")
    if args.resume and not begun:
        say(f"note: --resume: {out} holds no {kind} run to resume; starting a new one")
    if dist.is_main:
        check_output_dir(out)
    return dist, say, out


def check_output_dir(out: Path) -> None:
    """Create --output-dir and make sure it takes files, or raise UserError in one line saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--output-dir {out} is a file, not a folder") from None
    except NotADirectoryError:
        raise UserError(f"--output-dir {out}: a part of that path is a file, not a folder") from None
    except PermissionError:
        raise UserError(f"--output-dir {out} cannot be created: permission denied") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {out} is not writable")
