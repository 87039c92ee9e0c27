"""The training engine shared by search and retrain.

One loop: bf16 autocast on CUDA (fp32 on CPU), timm's Mixup, gradient clipping, timm's model EMA, a
per-step LR schedule (timm's CosineLRScheduler or constant, with warmup), DDP. Each epoch writes an atomic
checkpoint (model, optimizer, scheduler, EMA, scaler, RNG states, epoch, the log so far) and one JSON line; a
run resumes exactly where it stopped. SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before a
kill) are deferred to the end of the step in flight, or stop an evaluation between batches: the state saved is
always that of a finished step, so --resume continues bit for bit (a second Ctrl-C stops at once and says that
the last checkpoint stands). A non-finite loss stops the run and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from ..distributed import Distributed
from ..errors import Interrupted, NonFiniteLossError, UserError
from ..files import atomic_save, atomic_write, remove_stale_temporaries
from ..gates import BlockGates
from .checkpoints import CHECKPOINT, FORMAT, read_checkpoint, rng_state, set_rng_state

LOG = "log.jsonl"


# The signals that stop a run cleanly: what they are called, and the exit status of a process they ended.
STOP_SIGNALS = {signal.SIGINT: ("interrupted (Ctrl-C)", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}


class _StopRequested(Exception):
    """Raised at a step boundary or between evaluation batches once a stop signal has arrived."""


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    weight_decay: float
    sched: str = "constant"          # "constant" | "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None
    ema_decay: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    log_interval: int = 10


@contextlib.contextmanager
def deferred_stop_signals(trainer: "Trainer"):
    """While training: SIGINT and SIGTERM only set trainer.stop_signal; the loop acts on it at the next step
    boundary. A second SIGINT raises KeyboardInterrupt at once. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, tokens, positions, layer scales or gates."""
    gate_ids = {id(p) for m in model.modules() if isinstance(m, BlockGates) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or id(p) in gate_ids or name.endswith(("cls_token", "dist_token", "reg_token",
                                                                   "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LossParts:
    """Running sums of the loss parts, kept on the device (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def means(self, dist: Distributed) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        t = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        t = dist.all_reduce_sum(t) / dist.world_size
        return dict(zip(keys, t.tolist()))


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""(outputs, targets, images) -> loss parts; parts["loss"] is optimised."""


class Trainer:
    def __init__(self, model: nn.Module, recipe: Recipe, train_loader, val_loader, sampler,
                 dist: Distributed, output_dir: Path, num_classes: int, loss_fn: LossFn,
                 penalty: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
                 epoch_end: Callable[[int, dict], None] | None = None, checkpoint_extra: dict | None = None,
                 progress: bool | None = None, name: str = "train", fingerprint: dict | None = None) -> None:
        """fingerprint: what the result depends on beyond the recipe (model, batch size, world size, data,
        search mode, sparsity weights, ...); --resume refuses a checkpoint whose fingerprint differs."""
        self.model, self.recipe, self.dist, self.name = model, recipe, dist, name
        self.train_loader, self.val_loader, self.sampler = train_loader, val_loader, sampler
        self.output_dir, self.loss_fn, self.penalty, self.epoch_end = output_dir, loss_fn, penalty, epoch_end
        self.checkpoint_extra = checkpoint_extra or {}
        self.device = dist.device
        self.amp = self.device.type == "cuda"
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.module = model
        self.ddp = None
        if dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
        self.steps_per_epoch = len(train_loader)
        total = recipe.epochs * self.steps_per_epoch
        warmup = int(min(recipe.warmup_epochs, recipe.epochs / 2) * self.steps_per_epoch)  # never the whole run
        if recipe.sched == "cosine":
            self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(total - warmup, 1),
                                               lr_min=recipe.min_lr, warmup_t=warmup, warmup_lr_init=recipe.warmup_lr,
                                               warmup_prefix=True, t_in_epochs=False)
        elif recipe.sched == "constant":
            self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(total, 1), lr_min=recipe.lr,
                                               warmup_t=warmup, warmup_lr_init=recipe.warmup_lr,
                                               warmup_prefix=True, t_in_epochs=False)
        else:
            raise UserError(f"--sched must be 'constant' or 'cosine', got {recipe.sched!r}")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # bf16 needs no loss scaling
        self.ema = ModelEmaV3(model, decay=recipe.ema_decay) if recipe.ema_decay else None
        self.mixup = None
        if recipe.mixup > 0 or recipe.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                               label_smoothing=recipe.smoothing, num_classes=num_classes)
        self.epoch, self.start_batch, self.global_step = 0, 0, 0
        self.history: list[dict] = []       # every epoch's record: log.jsonl is rewritten from it on resume
        self.pending: dict | None = None    # an epoch trained but not yet evaluated (stopped in its evaluation)
        self.stop_signal: int | None = None
        self.epoch_parts: LossParts | None = None  # the epoch in flight's running loss sums (saved mid-epoch)
        self.fingerprint = {"recipe": _recipe_fingerprint(recipe), "world_size": dist.world_size,
                            "steps_per_epoch": self.steps_per_epoch, "flags": fingerprint or {}}
        if dist.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(output_dir)

    # -- checkpoints -----------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT

    def state(self, epoch: int, start_batch: int) -> dict:
        return {"format": FORMAT, "name": self.name, "epoch": epoch, "start_batch": start_batch,
                "global_step": self.global_step, "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None, "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "recipe": asdict(self.recipe), "history": self.history, "pending": self.pending,
                "fingerprint": self.fingerprint, "epoch_parts": self._parts_state(start_batch), **self.checkpoint_extra}

    def _parts_state(self, start_batch: int) -> dict | None:
        """Mid-epoch: the loss sums so far, so the resumed epoch's mean loss is the uninterrupted one's."""
        if start_batch == 0 or self.epoch_parts is None:
            return None
        return {"sums": {k: v.cpu() for k, v in self.epoch_parts.sums.items()}, "count": self.epoch_parts.count}

    def save(self, epoch: int, start_batch: int = 0) -> None:
        if self.dist.is_main:
            atomic_save(self.state(epoch, start_batch), self.checkpoint_path)
        self.dist.barrier()

    def resume(self, ckpt: dict) -> None:
        if ckpt.get("name") != self.name:
            raise UserError(f"checkpoint is from a {ckpt.get('name')!r} run, not {self.name!r}")
        _refuse_differences(self.checkpoint_path, ckpt.get("fingerprint"), self.fingerprint)
        _refuse_past_epochs(self.checkpoint_path, ckpt, self.recipe.epochs)
        try:
            self.module.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint does not match the model: {str(e).splitlines()[1].strip()}") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.start_batch, self.global_step = ckpt["epoch"], ckpt["start_batch"], ckpt["global_step"]
        self.history, self.pending = list(ckpt.get("history") or []), ckpt.get("pending")
        self.epoch_parts = None
        if ckpt.get("epoch_parts"):
            self.epoch_parts = LossParts()
            self.epoch_parts.sums = {k: v.to(self.device) for k, v in ckpt["epoch_parts"]["sums"].items()}
            self.epoch_parts.count = ckpt["epoch_parts"]["count"]
        set_rng_state(ckpt["rng"])
        self.rewrite_log()  # the log says what the checkpoint holds: no epoch repeated or lost by a kill

    def rewrite_log(self) -> None:
        if self.dist.is_main:
            text = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write(self.output_dir / LOG, lambda tmp: Path(tmp).write_text(text))

    # -- the loop --------------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.output_dir / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> dict | None:
        """Train from self.epoch to recipe.epochs; returns the last epoch's record. Raises Interrupted after a
        stop signal, once the state is saved."""
        record = None
        self.stop_signal = None
        with deferred_stop_signals(self):
            try:
                if self.pending is not None:  # resumed in an evaluation: that epoch's training is done
                    record = self.finish_epoch(self.pending)
                while self.epoch < self.recipe.epochs:
                    record = self.train_epoch(self.epoch, self.start_batch)
                    self.epoch, self.start_batch = self.epoch + 1, 0
                    record = self.finish_epoch(record)
            except _StopRequested:
                what, code = STOP_SIGNALS.get(self.stop_signal, ("stopped", 130))
                where = (f"epoch {self.epoch} trained, its evaluation runs first on --resume" if self.pending
                         else f"epoch {self.epoch + 1}, after step {self.start_batch} of {self.steps_per_epoch}")
                raise Interrupted(f"{what}; state saved to {self.checkpoint_path} ({where}): resume with --resume",
                                  exit_code=code) from None
            except KeyboardInterrupt:  # a second Ctrl-C, mid-step: there is no consistent state to save now
                if self.checkpoint_path.exists():
                    raise Interrupted(f"interrupted twice; nothing saved now, the last checkpoint "
                                      f"{self.checkpoint_path} stands: resume with --resume") from None
                raise Interrupted("interrupted twice before the first checkpoint; nothing saved, nothing to resume: "
                                  "start the run again") from None
        return record

    def finish_epoch(self, record: dict) -> dict:
        """Evaluate the epoch just trained (self.epoch), then log and checkpoint it."""
        self.pending = record
        try:
            record.update(self.evaluate_all())
        except _StopRequested:
            self.save(self.epoch)  # the trained state, with the epoch's record pending
            raise
        if self.epoch_end is not None:
            self.epoch_end(self.epoch, record)
        self.pending = None
        self.history.append(record)
        self.save(self.epoch)
        self.log(record)  # after the checkpoint: a kill in between leaves a line that resume writes back
        if self.dist.is_main:
            print(self.summary_line(record), file=sys.stderr)
        return record

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived (on any rank: every process must stop at the same step)."""
        flag = self.stop_signal is not None
        if self.dist.enabled:
            flag = self.dist.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0
            if flag and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM  # another rank was signalled (a scheduler signals them all)
        return flag

    def summary_line(self, r: dict) -> str:
        parts = [f"{self.name} epoch {r['epoch']}/{self.recipe.epochs}", f"loss {r['loss']:.4f}",
                 f"top-1 {r['top1']:.2f}%"]
        if "ema_top1" in r:
            parts.append(f"EMA top-1 {r['ema_top1']:.2f}%")
        parts.append(f"{r['img_per_s']:.0f} img/s")
        if "kept" in r:
            parts.append("kept " + "/".join(f"{v:.0%}" for v in r["kept"].values()))
        return ", ".join(parts)

    def train_epoch(self, epoch: int, start_batch: int) -> dict:

        model = self.ddp or self.module
        model.train()
        self.sampler.set_epoch(epoch, start_batch)
        parts = self.epoch_parts if start_batch > 0 and self.epoch_parts is not None else LossParts()
        self.epoch_parts = parts
        step_in_epoch = start_batch
        seen, start = 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"{self.name} {epoch + 1}/{self.recipe.epochs}", leave=False,
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True,
                   initial=start_batch, total=self.steps_per_epoch)
        try:
            for images, targets in bar:
                images = images.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                if self.mixup is not None:
                    images, targets = self.mixup(images, targets)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    outputs = model(images)
                    step_parts = self.loss_fn(outputs, targets, images)
                    if self.penalty is not None:
                        extra = self.penalty(self.module)
                        step_parts = {**step_parts, **extra, "loss": step_parts["loss"] + extra["penalty"]}
                loss = step_parts["loss"]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.recipe.clip_grad:
                    nn.utils.clip_grad_norm_(self.module.parameters(), self.recipe.clip_grad)
                self.optimizer.step()
                self.global_step += 1
                step_in_epoch += 1
                self.scheduler.step_update(self.global_step)
                if self.ema is not None:
                    self.ema.update(self.module, step=self.global_step)
                parts.add(step_parts)
                seen += images.shape[0]
                if step_in_epoch % self.recipe.log_interval == 0 or step_in_epoch == self.steps_per_epoch:
                    self.check_finite(loss, epoch, step_in_epoch)
                    bar.set_postfix(loss=f"{loss.item():.4f}",
                                    img_s=f"{seen * self.dist.world_size / (time.perf_counter() - start):.0f}")
                if self.stop_requested() and step_in_epoch < self.steps_per_epoch:
                    self.start_batch = step_in_epoch
                    self.save(epoch, step_in_epoch)  # a finished step: what --resume continues from
                    raise _StopRequested
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **parts.means(self.dist),
                  "img_per_s": seen * self.dist.world_size / max(elapsed, 1e-9), "epoch_seconds": elapsed}
        return record

    def check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.dist.all_reduce_sum(bad).item() > 0:
            kept = (f"the last good checkpoint is {self.checkpoint_path} (epoch {self.epoch})"
                    if self.checkpoint_path.exists() else "no checkpoint was written yet")
            raise NonFiniteLossError(f"the loss became {loss.item()} at epoch {epoch + 1} step {step}; "
                                     f"stopping, {kept}. Lower --lr or check the data.")

    def evaluate_all(self) -> dict[str, float]:
        result = evaluate(self.module, self.val_loader, self.dist, self.stop_requested, self.progress)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.dist, self.stop_requested, self.progress)
            result.update({"ema_top1": ema["top1"], "ema_top5": ema["top5"]})
        return result


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: Distributed, stop_requested: Callable[[], bool] | None = None,
             progress: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) over the validation set (each rank its shard, summed). stop_requested is
    asked between batches (a stop signal during evaluation: _StopRequested)."""
    model.eval()
    device = dist.device
    totals = torch.zeros(3, device=device)  # correct@1, correct@5, count
    bar = tqdm(loader, desc="evaluating", leave=False, disable=not (progress and dist.is_main), dynamic_ncols=True)
    for images, targets in bar:
        if stop_requested is not None and stop_requested():
            bar.close()
            raise _StopRequested
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top == targets.unsqueeze(-1)  # label -1 (an image that could not be read) hits nothing
        totals += torch.stack([hit[:, 0].sum(), hit.any(-1).sum(), (targets >= 0).sum()])
    correct1, correct5, count = dist.all_reduce_sum(totals).tolist()
    return {"top1": 100.0 * correct1 / max(count, 1), "top5": 100.0 * correct5 / max(count, 1)}


def _recipe_fingerprint(recipe: Recipe) -> dict:
    """The recipe fields a resumed run must share: all but the log interval, and the epochs where the schedule
    is constant (a search may be extended with a larger --epochs; a cosine schedule depends on them)."""
    fields = asdict(recipe)
    fields.pop("log_interval")
    if recipe.sched == "constant":
        fields.pop("epochs")
    return fields


def check_resume_flags(path: Path, flags: dict, epochs: int | None = None) -> None:
    """Before any long work: UserError in one line if the run checkpointed at `path` (if any) was started with
    other flags (cli.fingerprint) than `flags`, or has trained more than `epochs` epochs already."""
    if path.exists():
        ckpt = read_checkpoint(path)
        _refuse_differences(path, (ckpt.get("fingerprint") or {}).get("flags"), flags)
        _refuse_past_epochs(path, ckpt, epochs)


def _refuse_past_epochs(path: Path, ckpt: dict, epochs: int | None) -> None:
    if epochs is not None and ckpt.get("epoch", 0) > epochs:
        raise UserError(f"--resume: the run in {path} has trained {ckpt['epoch']} epochs already, past --epochs "
                        f"{epochs}; give --epochs {ckpt['epoch']} or more to continue it (or another --output-dir)")


def _refuse_differences(path: Path, saved: dict | None, current: dict) -> None:
    differences = _differences(saved, current)
    if differences:
        raise UserError(f"--resume: this run differs from the one in {path} in {'; '.join(differences)}; resume "
                        f"with the flags it was started with, or use another --output-dir")


def _differences(saved: dict | None, current: dict, prefix: str = "") -> list[str]:
    """'key (saved X, now Y)' for every entry of two fingerprints that differs (None: an older checkpoint)."""
    if saved is None:
        return []
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, "" if key == "flags" else f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (saved {a!r}, now {b!r})")
    return out


def cross_entropy_loss(smoothing: float) -> LossFn:
    """Soft targets (from mixup) or hard targets with label smoothing."""
    def loss_fn(outputs, targets, images):
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        if targets.dim() == 2:
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        return {"loss": loss, "task": loss}
    return loss_fn


def distillation_loss(base, teacher, kind: str, alpha: float, tau: float):
    """DeiT's distillation: the student's distillation head (or its only head) learns from the teacher."""
    def loss_fn(outputs, targets, images):
        parts = base(outputs, targets, images)
        student = outputs[1] if isinstance(outputs, tuple) else outputs
        with torch.no_grad():
            teacher_logits = teacher(images).float()
        student = student.float()
        if kind == "soft":
            kd = F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                          reduction="batchmean", log_target=True) * tau * tau
        else:
            kd = F.cross_entropy(student, teacher_logits.argmax(dim=-1))
        return {**parts, "distill": kd, "loss": (1 - alpha) * parts["loss"] + alpha * kd}
    return loss_fn


def check_recipe(recipe: Recipe) -> None:
    if recipe.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {recipe.epochs}")
    if not recipe.lr > 0 or not math.isfinite(recipe.lr):
        raise UserError(f"--lr must be a positive number, got {recipe.lr}")
    if recipe.ema_decay is not None and not 0.0 < recipe.ema_decay < 1.0:
        raise UserError(f"--model-ema-decay must be in (0, 1), got {recipe.ema_decay}")
