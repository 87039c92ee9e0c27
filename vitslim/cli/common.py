"""What the commands share: running a command (one-line errors, exit codes), argument types and shared flags,
the start of a run (processes, seeds, output folder), the data a run reads.

The command line sits on top of the library and nothing in the library imports it: the library raises
vitslim.errors' exceptions, and `run` turns them into one line on stderr and an exit status.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.device import LOADERS
from ..data.loaders import BAD_IMAGES, Augment, Data, embedded_digits, image_folders, input_on_device
from ..distributed import Distributed, setup_distributed
from ..engine.checkpoints import seed_everything
from ..errors import Interrupted, NonFiniteLossError, UserError
from ..plan import has_token_gates
from ..threshold import check_budget

EXIT_USAGE = 2
EXIT_FAILED = 1        # the run itself failed (e.g. the loss became NaN)
EXIT_INTERRUPTED = 130  # Ctrl-C, state saved

# Recipe flags search and retrain share, unset by the user: (DeiT's default for real data, the default for the
# embedded digits data). The DeiT augmentation and batch, and the threads (None: torch's default, the cores).
SHARED_DEFAULTS = {
    "batch_size": (128, 64), "mixup": (0.8, 0.0), "cutmix": (1.0, 0.0), "smoothing": (0.1, 0.0),
    "reprob": (0.25, 0.0), "drop_path": (0.1, 0.0), "threads": (None, 1),
}

# Errors that come from the user's input, wherever they are raised (the library's are all UserErrors).
USER_ERRORS = (UserError, FileNotFoundError)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's main: user errors become one line on stderr and exit status 2 (--debug: traceback)."""
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


class Budgets(tuple):
    """--budgets' (attn, mlp, tokens), and the text it was given as ('b': one budget for every kind of gate the model
    has; 'attn,mlp,tokens': each named)."""

    text: str

    def for_model(self, arch) -> tuple[float, float, float]:
        """The budgets threshold takes for a model of this arch: a model without token gates (Swin) keeps every
        token, and a token budget below 1 named for it is a UserError."""
        if has_token_gates(arch.block_widths()):
            return tuple(self)
        if "," in self.text and self[2] < 1.0:
            raise UserError(f"--budgets {self.text}: {arch.family} models have no token gates (windows and patch "
                            f"merging need the whole grid); give 'attn,mlp,1' or one budget")
        return (self[0], self[1], 1.0)


def budgets_type(text: str) -> Budgets:
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
        budgets = Budgets(check_budget(n, v) for n, v in zip(("budget_attn", "budget_mlp", "budget_tokens"), values))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    budgets.text = text
    return budgets


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


def add_data_args(group, img_size_help: str, data_path_help: str) -> None:
    """--img-size and --data-path (each command says what they mean to it), --threads and --workers."""
    group.add_argument("--img-size", type=positive_int("--img-size"), default=None, metavar="PX", help=img_size_help)
    group.add_argument("--data-path", default=None, help=data_path_help)
    add_process_args(group)


def add_process_args(group) -> None:
    """--threads and --workers, shared by python -m vitslim.search and retrain."""
    group.add_argument("--threads", type=positive_int("--threads"), default=None,
                       help="torch's intra-op threads (CPU work); default: 1 on the embedded data (a tiny model at a "
                            "small batch only loses to more threads), else torch's default (the cores)")
    group.add_argument("--workers", type=non_negative_int("--workers"), default=4,
                       help="data loading processes per rank (default: 4)")


def add_loader_arg(group) -> None:
    """--loader, shared by python -m vitslim.search and retrain."""
    group.add_argument("--loader", choices=LOADERS, default="cpu",
                       help="where training images are decoded and augmented: cpu (default: the loader workers, "
                            "Pillow), gpu (workers read files and draw the augmentation; the GPU decodes with "
                            "nvJPEG and augments, batched) or dali (the same with NVIDIA DALI's decoder, an "
                            "optional install); the same recipe and draws either way")


def add_bad_images_arg(group) -> None:
    """--bad-images, shared by python -m vitslim.search and retrain."""
    group.add_argument("--bad-images", choices=BAD_IMAGES, default="skip",
                       help="an image that cannot be decoded: skip (default; a warning naming it, a training "
                            "image replaced by the next readable one, a validation image left out of the "
                            "accuracy) or stop (the run stops naming it)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit status 2 (argparse's own default status, kept)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


def fingerprint(args, data_description: str, *names: str) -> dict:
    """What a resumed run must share with the run it continues beyond its recipe: the data and the named flags
    (vitslim.engine.trainer.Trainer refuses a checkpoint whose fingerprint differs, naming what differs)."""
    return {"data": data_description, **{f"--{n.replace('_', '-')}": getattr(args, n) for n in names}}


def start_run(args, started: list[str], kind: str) -> tuple[Distributed, Callable[..., None], Path]:
    """Processes, the rank-0 printer, and the output folder of a command; refuses to overwrite a run.

    started: files under --output-dir whose presence means a run already began there.
    """
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


def run_data(args, img_size: int, mean, std, device: torch.device, say: Callable[[str], None]) -> Data:
    """The data of a search or retrain run on `device`: the embedded digits without --data-path, else the image
    folders with --aa, --reprob and --loader."""
    if args.data_path is None:
        if args.loader != "cpu":
            say(f"warning: --loader {args.loader} ignored: it applies to --data-path image folders, and the "
                f"embedded digits are tensors already")
        return embedded_digits(img_size)
    if args.loader == "dali" and device.type != "cuda":
        raise UserError(f"--loader dali decodes on a CUDA device; this run is on {device}: use --loader cpu")
    if args.loader == "gpu" and device.type != "cuda":
        say(f"warning: --loader gpu on {device}: the main process decodes and augments every batch on the CPU, "
            f"one core; --loader cpu spreads that over the --workers")
    return image_folders(args.data_path, img_size, mean, std, Augment(rand_augment=args.aa, reprob=args.reprob),
                         on_device=input_on_device(device) or args.loader != "cpu", loader=args.loader)
