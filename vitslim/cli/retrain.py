"""`python -m vitslim.retrain`: threshold a search, build the physically slim model, retrain it, report; or
fine-tune a saved slim model (--slim), on its data or on a new dataset (--new-head: a fresh classifier).

Writes to --output-dir: plan.json, checkpoint.pt (each epoch, atomic), log.jsonl, slim/ (save_slim: weights
in safetensors + config JSON) and report.json (dense vs slim params, FLOPs, top-1/top-5, throughput; a fine-tune
has no dense model to compare with).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..families import family_named
from ..counting import count_flops
from ..data.loaders import loaders
from ..engine.checkpoints import (CHECKPOINT, IMAGENET_MEAN, IMAGENET_STD, checkpoint_file, dense_model, dense_weights,
                                  load_search, read_checkpoint, search_data_config)
from ..engine.trainer import (Recipe, Trainer, check_recipe, check_resume_flags, cross_entropy_loss,
                              distillation_loss, evaluate)
from ..errors import UserError
from ..plan import SlimPlan
from ..pretrained import create_model, read_state_dict
from ..reporting.report import compare_throughput, format_report, kept_tokens, model_row, write_report
from ..saving import load_slim, plain_cfg, save_slim
from ..slim import resize_refusal, set_drop_path, set_pretrained_cfg, slim
from . import common as cli
from .common import ArgumentParser, add_bad_images_arg, add_loader_arg, run_data, threads_text
from .plan import add_target_args, alignment_of, chosen_target, make_plan

# Recipe flags: (DeiT's default for real data, the default for the embedded digits data).
DEFAULTS = {
    **cli.SHARED_DEFAULTS, "epochs": (300, 30), "warmup_epochs": (5, 2), "model_ema_decay": (None, None),
    "lr": (None, 1e-3),  # None: LR_PER_512 x global batch / 512
}
# Fine-tuning a saved slim model (--slim) on real data: shorter and gentler than a retrain (a tenth of its rate per
# 512 images: the weights are trained already), the DeiT augmentation kept; on the embedded data, its light recipe.
FINETUNE_DEFAULTS = {
    "epochs": 100, "batch_size": 128, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "reprob": 0.25,
    "drop_path": 0.1, "warmup_epochs": 2, "model_ema_decay": None, "lr": None, "threads": None,
}
LR_PER_512 = {"retrain": 5e-4, "finetune": 5e-5}  # learning rate per 512 images of global batch, when --lr is unset

# Flags a resumed retrain must share with the run it continues (beyond the recipe): they change its result.
RUN_FLAGS = ("fold_gates", "fused", "batch_size", "seed", "aa", "reprob", "drop_path", "teacher",
             "teacher_checkpoint", "distillation_type", "distillation_alpha", "distillation_tau", "new_head",
             "img_size", "slim")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vitslim.retrain", description=__doc__.splitlines()[0])
    g = p.add_argument_group("what to slim (--searched) or fine-tune (--slim)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--searched", help="checkpoint.pt of a vitslim.search run (or its folder)")
    source.add_argument("--slim", metavar="SLIM_DIR", help="a saved slim model (save_slim's folder, e.g. the slim/ "
                        "of a retrain run) to fine-tune as it is: its plan is fixed")
    g.add_argument("--budget-attn", type=cli.budget_type("--budget-attn"), default=None, help="default 0.7")
    g.add_argument("--budget-mlp", type=cli.budget_type("--budget-mlp"), default=None, help="default 0.7")
    g.add_argument("--budget-tokens", type=cli.budget_type("--budget-tokens"), default=None,
                   help="default 0.7 (a model without token gates, Swin, keeps every token)")
    g.add_argument("--plan", default=None, help="a plan JSON instead of the budgets")
    add_target_args(g, sweep=False)  # --target-flops/params, --mix, --align-heads/mlp: as python -m vitslim.plan
    g.add_argument("--fold-gates", action="store_true", help="multiply kept gate values into the weights")
    g.add_argument("--fused", action="store_true", help="ragged-attention kernels (CUDA); else the reference")
    g = p.add_argument_group("data")
    g.add_argument("--new-head", action="store_true", help="a new classifier for the data's classes (transfer to "
                   "another dataset), initialised afresh; without it the data must have the model's classes")
    cli.add_data_args(g, "train and evaluate at this image size (timm's set_input_size; refused when the plan "
                         "drops tokens, which are positions of the grid it was searched on)",
                      "train/ and val/ class folders (default: the data the search used, if it was the embedded "
                      "digits)")
    g = p.add_argument_group("recipe (defaults: DeiT's; lighter ones on the embedded data)")
    add_bad_images_arg(g)
    add_loader_arg(g)
    g.add_argument("--epochs", type=cli.positive_int("--epochs"), default=None)
    g.add_argument("--batch-size", type=cli.positive_int("--batch-size"), default=None, help="per process")
    g.add_argument("--lr", type=cli.positive("--lr"), default=None, help="default: 5e-4 x global batch / 512")
    g.add_argument("--min-lr", type=cli.non_negative("--min-lr"), default=1e-5)
    g.add_argument("--warmup-epochs", type=cli.non_negative("--warmup-epochs"), default=None)
    g.add_argument("--weight-decay", type=cli.non_negative("--weight-decay"), default=0.05)
    g.add_argument("--mixup", type=cli.non_negative("--mixup"), default=None)
    g.add_argument("--cutmix", type=cli.non_negative("--cutmix"), default=None)
    g.add_argument("--smoothing", type=cli.fraction("--smoothing"), default=None)
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=cli.unit_interval("--reprob"), default=None)
    g.add_argument("--drop-path", type=cli.fraction("--drop-path"), default=None)
    g.add_argument("--model-ema-decay", type=cli.fraction("--model-ema-decay"), default=None)
    g.add_argument("--clip-grad", type=cli.non_negative("--clip-grad"), default=None)
    g.add_argument("--seed", type=cli.non_negative_int("--seed"), default=0)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, help="'dense' (the model the search started from) or a timm name")
    g.add_argument("--teacher-checkpoint", default=None, help="local weights for a timm --teacher")
    g.add_argument("--distillation-type", choices=("soft", "hard"), default="soft")
    g.add_argument("--distillation-alpha", type=cli.unit_interval("--distillation-alpha"), default=0.5)
    g.add_argument("--distillation-tau", type=cli.positive("--distillation-tau"), default=1.0)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="runs/retrain")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--device", default=None, choices=("cuda", "cpu"))
    g.add_argument("--throughput-batch", type=cli.positive_int("--throughput-batch"), default=None,
                   help="batch size of the throughput measurement (default: the training batch)")
    g.add_argument("--log-interval", type=cli.positive_int("--log-interval"), default=10)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    embedded = args.data_path is None
    target = chosen_target(args)
    budget_given = any(b is not None for b in (args.budget_attn, args.budget_mlp, args.budget_tokens))
    if sum((args.plan is not None, target is not None, budget_given)) > 1:
        raise UserError("give one of --plan, a --target-*, or --budget-* flags")
    if args.slim is not None:
        fixed = [flag for flag, given in (("--plan", args.plan is not None), ("a --target-*", target is not None),
                                          ("--budget-*", budget_given), ("--fold-gates", args.fold_gates)) if given]
        if fixed:
            raise UserError(f"--slim fine-tunes a slim model as it is (its plan is fixed): {', '.join(fixed)} "
                            f"apply to --searched only")
        if args.teacher == "dense":
            raise UserError("--teacher dense is the dense model of a search; with --slim give a timm --teacher")
        student, arch, plan, data_cfg, ckpt = load_finetune_source(Path(args.slim))
        kind = "finetune"
        for name, value in FINETUNE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, DEFAULTS[name][1] if embedded else value)
    else:
        args.searched = str(checkpoint_file(args.searched))  # a run folder: its checkpoint.pt
        search_model, arch, ckpt = load_search(Path(args.searched))
        if embedded and not ckpt.get("embedded", False):
            raise UserError("--data-path is needed: the search did not use the embedded data")
        data_cfg, kind = search_data_config(ckpt, arch), "retrain"
        resolve_defaults(args, arch, embedded)
    img = args.img_size or arch.img_size[0]
    # Checked before any work: the teacher must take the model's images and predict its classes (the data's: with
    # --new-head they are known once the data is read, and it is checked then).
    teacher = None
    if args.teacher is not None and not args.new_head:
        teacher = _teacher(args, arch, ckpt, arch.num_classes, img)
    dist, say, out = cli.start_run(args, [CHECKPOINT], "retrain")

    if args.slim is None:
        plan = _retrain_plan(args, search_model, arch, target, dist.device)
        student = slim(search_model, plan, fold_gates=args.fold_gates, fused=args.fused)
    if img != arch.img_size[0]:
        why = resize_refusal(student)
        if why is not None:
            raise UserError(f"--img-size {img}: the plan is for {arch.img_size[0]}x{arch.img_size[1]} images and {why}"
                            f"; train at {arch.img_size[0]}, or search at {img} (search --img-size {img})")
        student.set_input_size(img)
        say(f"image size {img}x{img} (the plan's {arch.img_size[0]}x{arch.img_size[1]}: position embedding "
            f"resampled, every patch kept)")
    plan = student.slim_plan  # (at --img-size: the plan on the new grid)
    if dist.is_main:
        (out / "plan.json").write_text(plan.to_json(indent=1))
    say(plan.summary())
    set_drop_path(student, args.drop_path)
    student.to(dist.device)

    data = run_data(args, img, data_cfg.get("mean", IMAGENET_MEAN), data_cfg.get("std", IMAGENET_STD), dist.device,
                    say)
    known_classes = tuple(ckpt.get("classes") or ()) if ckpt else ()
    if args.new_head:
        student.reset_classifier(data.num_classes)
        student.to(dist.device)  # timm makes the new head on the default device
        say(f"new head: the classifier is initialised afresh for the {data.num_classes} classes of "
            f"{data.description.split(':')[0]}")
        if args.teacher is not None:
            teacher = _teacher(args, arch, ckpt, data.num_classes, img)
    else:
        _check_same_classes(data, student.num_classes, known_classes, args.slim or args.searched)
    set_pretrained_cfg(student, data.pretrained_cfg(getattr(student, "pretrained_cfg", None)))
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UserError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    train_loader, val_loader, sampler = loaders(data, args.batch_size, dist, args.seed, args.workers,
                                                  args.bad_images)
    flags = cli.fingerprint(args, data.description, *RUN_FLAGS)
    if args.resume:  # a different recipe is refused now, before the teacher or any training
        check_resume_flags(out / CHECKPOINT, flags, args.epochs)
    lr = args.lr if args.lr is not None else LR_PER_512[kind] * args.batch_size * dist.world_size / 512
    recipe = Recipe(epochs=args.epochs, lr=lr, weight_decay=args.weight_decay, sched="cosine",
                    warmup_epochs=args.warmup_epochs, min_lr=min(args.min_lr, lr), clip_grad=args.clip_grad,
                    ema_decay=args.model_ema_decay, mixup=args.mixup, cutmix=args.cutmix,
                    smoothing=args.smoothing, log_interval=args.log_interval)
    check_recipe(recipe)

    loss_fn = cross_entropy_loss(args.smoothing)
    if teacher is not None:
        teacher = teacher.to(dist.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if getattr(arch, "distilled", False):
            student.set_distilled_training(True)
        loss_fn = distillation_loss(loss_fn, teacher, args.distillation_type, args.distillation_alpha,
                                    args.distillation_tau)
        say(f"distilling from {args.teacher} ({args.distillation_type}, alpha {args.distillation_alpha})")

    source = ({"finetuned_from": str(Path(args.slim).resolve())} if args.slim else
              {"searched": str(Path(args.searched).resolve())})
    extra = {"plan": plan.to_dict(), "fold_gates": args.fold_gates, **source, "classes": list(data.classes),
             "pretrained_cfg": plain_cfg(student.pretrained_cfg)}
    trainer = Trainer(student, recipe, train_loader, val_loader, sampler, dist, out, data.num_classes, loss_fn,
                      checkpoint_extra=extra, progress=args.progress, name="retrain",
                      fingerprint=flags)
    if args.resume and trainer.checkpoint_path.exists():
        saved = read_checkpoint(trainer.checkpoint_path)
        if SlimPlan.from_dict(saved["plan"]) != plan:
            raise UserError(f"{trainer.checkpoint_path} was retraining another plan; use another --output-dir")
        trainer.resume(saved)
    dense_flops = count_flops(family_named(arch.family).build_meta(arch))
    verb = "fine-tuning the slim model" if args.slim else "retraining the slim model"
    say(f"{verb} ({count_flops(student) / dense_flops:.1%} of the dense FLOPs) for "
        f"{args.epochs} epochs, lr {lr:g}, {dist.world_size} process(es) x batch {args.batch_size}"
        + (f" ({threads_text(torch.get_num_threads())})" if dist.device.type == "cpu" else ""))
    record = trainer.fit()

    if getattr(arch, "distilled", False):
        student.set_distilled_training(False)
    # (every rank: evaluate sums the ranks' shards, so rank 0 alone would wait for the others forever)
    slim_eval = evaluate(student, val_loader, dist) if record is None else \
        {"top1": record["top1"], "top5": record["top5"]}
    if dist.is_main:
        save_slim(student, out / "slim")
        batch = args.throughput_batch or args.batch_size
        models = {"slim": student}
        if args.slim is None:  # the dense model the search started from, at this size and with this head
            dense = dense_model(arch, ckpt, Path(args.searched))
            if img != arch.img_size[0]:
                dense.set_input_size(img)
            if args.new_head:
                dense.reset_classifier(data.num_classes)
            models = {"dense": dense.to(dist.device), "slim": student}
        rates = compare_throughput(models, (img, img), batch, dist.device)
        # The dense model's accuracy is the search's, on the search's data and head: not this data's after a new head.
        dense_eval = ckpt["dense_eval"] if args.slim is None and not args.new_head else None
        report = write_report(
            out / "report.json",
            dense=model_row(models["dense"], dense_eval, rates["dense"]) if "dense" in models else None,
            slim=model_row(student, slim_eval, rates["slim"]),
            budgets=dict(plan.budgets),
            extra={"device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
                   "throughput_batch": batch, "fold_gates": args.fold_gates, "epochs": args.epochs,
                   "kept_tokens": kept_tokens(plan), "new_head": args.new_head, **source})
        print(format_report(report))
        say(f"wrote {out / 'slim'} and {out / 'report.json'}")
    return 0



def resolve_defaults(args, arch, embedded: bool) -> None:
    """Fill the recipe flags of a retrain the user left unset: the model family's own recipe on real data (Swin's),
    then DeiT's, or the embedded data's light one."""
    own = {} if embedded else family_named(arch.family).retrain_recipe
    for name, value in own.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, (paper, light) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, light if embedded else paper)


def _retrain_plan(args, search_model, arch, target, device) -> SlimPlan:
    """--plan, a --target-*, or the budgets (default 0.7 each)."""
    if args.plan is None:
        # unset: 0.7 (tokens: 0.7 where the model has token gates, all tokens where it has none)
        budgets = (0.7 if args.budget_attn is None else args.budget_attn,
                   0.7 if args.budget_mlp is None else args.budget_mlp, args.budget_tokens)
        return make_plan(search_model, target, budgets, args.mix, alignment_of(args), args, device, args.fused)
    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise UserError(f"--plan {plan_path} does not exist")
    try:
        plan = SlimPlan.from_json(plan_path.read_text())
    except UnicodeDecodeError:  # a binary file: a checkpoint.pt, a safetensors
        raise UserError(f"--plan {plan_path} is not a plan JSON (a binary file; a plan is the plan_*.json a "
                        f"search writes, or python -m vitslim.plan -o)") from None
    except ValueError as e:
        raise UserError(f"--plan {plan_path}: {e}") from None
    plan.check_fits(arch)
    return plan


def load_finetune_source(folder: Path):
    """(slim model in training mode, its arch, plan, data config, None) of a saved slim folder (--slim)."""
    model = load_slim(folder).train()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return model, model.slim_arch, model.slim_plan, cfg, None


def _check_same_classes(data, num_classes: int, known: tuple[str, ...], source: str) -> None:
    """Without --new-head the data must have the model's classes, in the same order when their names are known."""
    if data.num_classes != num_classes:
        raise UserError(f"the data has {data.num_classes} classes, the model {num_classes}: for another dataset "
                        f"add --new-head (a new classifier, initialised afresh)")
    if known and known != data.classes:
        differ = next(i for i, (a, b) in enumerate(zip(known, data.classes)) if a != b)
        raise UserError(f"the class folders differ from the search's: label {differ} is "
                        f"{data.classes[differ]!r} here, {known[differ]!r} in the search "
                        f"({source}); retrain on the data the search used, or add --new-head")


def _teacher(args, arch, ckpt: dict | None, num_classes: int, img_size: int):
    """The distillation teacher, checked before any training: it must take the data's images and predict its
    classes (a teacher is never trained here, so a classifier for other classes would teach noise)."""
    if args.teacher == "dense":
        searched = Path(args.searched)
        weights = dense_weights(ckpt, searched)
        if not weights.is_file():
            raise UserError(f"--teacher dense needs the dense weights of the search: neither "
                            f"{searched.parent / 'dense.safetensors'} nor {ckpt.get('dense_weights')} exists")
        teacher = dense_model(arch, ckpt, searched)
    else:
        extra = {}
        if args.teacher_checkpoint is not None:  # its classifier decides the classes, not timm's default
            head = read_state_dict(args.teacher_checkpoint).get("head.weight")
            if head is not None and head.ndim == 2:
                extra["num_classes"] = head.shape[0]
        teacher = create_model(args.teacher, pretrained=args.teacher_checkpoint is None,
                                   checkpoint=args.teacher_checkpoint, checkpoint_flag="--teacher-checkpoint",
                                   **extra)
    probe = torch.zeros(1, 3, img_size, img_size)
    try:
        with torch.no_grad():
            logits = teacher.eval()(probe)
    except (AssertionError, RuntimeError, ValueError) as e:
        cfg = getattr(teacher, "pretrained_cfg", None) or {}
        size = "x".join(map(str, cfg.get("input_size", ())[1:])) or "another size"
        raise UserError(f"--teacher {args.teacher} cannot take the data's {img_size}x{img_size} images (it is made "
                        f"for {size}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); use "
                        f"a teacher for {img_size}x{img_size} images, e.g. --teacher dense") from None
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.shape[-1] != num_classes:
        raise UserError(f"--teacher {args.teacher} predicts {logits.shape[-1]} classes, the data has {num_classes}: "
                        f"a teacher is used as it is, never trained here; give one trained on these classes "
                        f"(--teacher-checkpoint PATH) or --teacher dense")
    return teacher
