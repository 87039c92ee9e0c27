"""`python -m vitslim.search`: search a timm ViT with l1-penalised gates (the paper's recipe).

Writes to --output-dir: checkpoint.pt (each epoch, atomic), log.jsonl, figures/ (gate histograms, searched
structure), dense.safetensors (the weights the search started from: the teacher and the dense baseline of
the retrain report), and plan_<attn>_<mlp>_<tokens>.json for each of --budgets at the end.
"""
from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file, save_file

from ..counting import count_flops, count_params
from ..data.loaders import loaders
from ..digits import DIGITS_MEAN, DIGITS_STD
from ..engine.checkpoints import CHECKPOINT, read_checkpoint
from ..engine.trainer import Recipe, Trainer, check_recipe, check_resume_flags, cross_entropy_loss, evaluate
from ..families import family_of
from ..errors import UserError
from ..files import atomic_write
from ..gates import SparsityWeights
from ..plan import SEARCH_MODES, has_token_gates
from ..pretrained import create_model
from ..reporting.figures import plot_gate_histograms, plot_structure
from ..saving import plain_cfg
from ..searchable import make_searchable
from ..slim import set_pretrained_cfg
from ..threshold import threshold
from ..token_drop import alive_tokens, drop_tokens
from . import common as cli
from .common import ArgumentParser, add_bad_images_arg, add_loader_arg, run_data, threads_text

# Recipe flags: (the paper's default for real data, the default for the embedded digits data).
DEFAULTS = {
    **cli.SHARED_DEFAULTS, "epochs": (50, 30), "dense_epochs": (0, 30), "dense_lr": (5e-4, 3e-3),
    "lr": (5e-4, 1e-3), "model_ema_decay": (0.99996, None), "w1": (2e-4, 2e-3), "w2": (5e-5, 5e-4),
    "w3": (1e-4, 1e-3),
}
EMBEDDED_MODEL = "vitslim_digits_vit"
# Flags a resumed run must share with the run it continues (beyond the recipe): they change its result. The
# last six are the search's own (the dense phase has the others).
RUN_FLAGS = ("model", "checkpoint", "pretrained", "img_size", "batch_size", "seed", "aa", "reprob", "drop_path",
             "fused", "search", "w1", "w2", "w3", "drop_tokens_below")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vitslim.search", description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="timm model name (default: deit_small_patch16_224 with "
                   f"--data-path, {EMBEDDED_MODEL} on the embedded data)")
    g.add_argument("--checkpoint", default=None, help="local weights (timm/DeiT .pth or .safetensors)")
    g.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights (needs network)")
    g.add_argument("--search", default="dims", choices=SEARCH_MODES, help="what a gate covers (default: dims)")
    g.add_argument("--fused", action="store_true", help="fused GPU kernels (without a CUDA GPU: the reference)")
    g.add_argument("--drop-tokens-below", type=cli.fraction("--drop-tokens-below"), default=None, metavar="EPS",
                   help="after each epoch, remove a patch from a block and all later blocks once its "
                        "|tanh(gate)| is below EPS (default: off)")
    g = p.add_argument_group("data")
    cli.add_data_args(g, "search at this image size (timm builds the model for it; pretrained position embeddings "
                         "are resampled); default: the model's (the embedded digits: 16)",
                      "folder with train/ and val/ class folders (default: the embedded digits data)")
    g = p.add_argument_group("recipe (defaults: the paper's; lighter ones on the embedded data)")
    add_bad_images_arg(g)
    add_loader_arg(g)
    g.add_argument("--epochs", type=cli.positive_int("--epochs"), default=None)
    g.add_argument("--dense-epochs", type=cli.non_negative_int("--dense-epochs"), default=None,
                   help="train the dense model first for this many epochs (default: 30 on the embedded data, "
                        "where no pretrained weights exist; else 0)")
    g.add_argument("--dense-lr", type=cli.positive("--dense-lr"), default=None,
                   help="peak lr of that dense training (cosine)")
    g.add_argument("--batch-size", type=cli.positive_int("--batch-size"), default=None, help="per process")
    g.add_argument("--lr", type=cli.positive("--lr"), default=None, help="constant learning rate (paper: 5e-4)")
    g.add_argument("--weight-decay", type=cli.non_negative("--weight-decay"), default=1e-3)
    g.add_argument("--w1", type=cli.non_negative("--w1"), default=None, help="attention gate l1 weight (2e-4)")
    g.add_argument("--w2", type=cli.non_negative("--w2"), default=None, help="MLP gate l1 weight (5e-5)")
    g.add_argument("--w3", type=cli.non_negative("--w3"), default=None, help="token gate l1 weight (1e-4)")
    g.add_argument("--mixup", type=cli.non_negative("--mixup"), default=None)
    g.add_argument("--cutmix", type=cli.non_negative("--cutmix"), default=None)
    g.add_argument("--smoothing", type=cli.fraction("--smoothing"), default=None)
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy (timm syntax)")
    g.add_argument("--reprob", type=cli.unit_interval("--reprob"), default=None, help="random erasing")
    g.add_argument("--drop-path", type=cli.fraction("--drop-path"), default=None)
    g.add_argument("--model-ema-decay", type=cli.fraction("--model-ema-decay"), default=None,
                   help="EMA decay (0 turns the EMA off)")
    g.add_argument("--clip-grad", type=cli.non_negative("--clip-grad"), default=None)
    g.add_argument("--seed", type=cli.non_negative_int("--seed"), default=0)
    g = p.add_argument_group("output")
    g.add_argument("--budgets", type=cli.budgets_type, nargs="+", default=[cli.budgets_type("0.7")],
                   help="plans to write at the end: 'b' or 'attn,mlp,tokens' each (default: 0.7; a model without "
                        "token gates, Swin, keeps every token)")
    g.add_argument("--output-dir", default="runs/search")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir where it stopped")
    g.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda if available")
    g.add_argument("--log-interval", type=cli.positive_int("--log-interval"), default=10)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def resolve_defaults(args, embedded: bool) -> None:
    """Fill the recipe flags the user left unset: the paper's, or the embedded data's."""
    for name, (paper, light) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, light if embedded else paper)
    if args.model is None:
        args.model = EMBEDDED_MODEL if embedded else "deit_small_patch16_224"
    if args.model_ema_decay == 0:
        args.model_ema_decay = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    embedded = args.data_path is None
    resolve_defaults(args, embedded)
    dist, say, out = cli.start_run(args, [CHECKPOINT, "dense.safetensors", f"dense/{CHECKPOINT}"], "search")

    model = create_model(args.model, args.pretrained, args.checkpoint, drop_path_rate=args.drop_path,
                             **({"num_classes": 10} if embedded else {}),
                             **({"img_size": args.img_size} if args.img_size else {}))
    family = family_of(model)  # refuses unsupported models before any data is read
    arch = family.describe(model)
    if args.drop_tokens_below and not has_token_gates(arch.block_widths()):
        raise UserError(f"--drop-tokens-below: {args.model} has no token gates ({family.name}: windows and patch "
                        "merging need the whole grid)")
    all_budgets = [b.for_model(arch) for b in args.budgets]
    fused = args.fused and dist.device.type == "cuda"
    mean, std = _mean_std(model, embedded)
    data = run_data(args, arch.img_size[0], mean, std, dist.device, say)
    if data.num_classes != arch.num_classes:
        model.reset_classifier(data.num_classes)
        arch = family.describe(model)
    # The data config this run trains with (size, mean/std, crop): saved with the search, carried to the slim model.
    set_pretrained_cfg(model, data.pretrained_cfg(getattr(model, "pretrained_cfg", None)))
    if not (embedded or args.pretrained or args.checkpoint or args.dense_epochs):
        say("warning: searching from random weights (neither --pretrained nor --checkpoint nor --dense-epochs): "
            "the paper searches a trained model; the gates of an untrained one rank noise")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UserError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    model.to(dist.device)
    dist.broadcast_module(model)  # one model for every rank: the dense baseline is measured on it, once
    train_loader, val_loader, sampler = loaders(data, args.batch_size, dist, args.seed, args.workers,
                                                  args.bad_images)
    if args.resume:  # a different recipe is refused now, before the dense weights or any training
        check_resume_flags(out / "dense" / CHECKPOINT, cli.fingerprint(args, data.description, *RUN_FLAGS[:-6]),
                           args.dense_epochs)
        check_resume_flags(out / CHECKPOINT, cli.fingerprint(args, data.description, *RUN_FLAGS), args.epochs)
    say(f"data: {data.description}")
    say(f"model: {args.model}, {count_params(model) / 1e6:.2f}M params, {count_flops(model) / 1e9:.3f} GMACs; "
        f"{dist.world_size} process(es) x batch {args.batch_size} on {dist.device}"
        + (f" ({threads_text(torch.get_num_threads())})" if dist.device.type == "cpu" else ""))
    weights = SparsityWeights(args.w1, args.w2, args.w3)
    common = dict(mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing, clip_grad=args.clip_grad,
                  ema_decay=args.model_ema_decay, log_interval=args.log_interval)

    # Phase 1 (embedded data, or --dense-epochs): train the dense model the search starts from.
    dense_file = out / "dense.safetensors"
    loss_fn = cross_entropy_loss(args.smoothing)
    if args.dense_epochs > 0 and not dense_file.exists():
        (out / "dense").mkdir(exist_ok=True, parents=True)
        dense_recipe = Recipe(epochs=args.dense_epochs, lr=args.dense_lr, weight_decay=0.05, sched="cosine",
                              warmup_epochs=0.1 * args.dense_epochs, **common)
        check_recipe(dense_recipe)
        trainer = Trainer(model, dense_recipe, train_loader, val_loader, sampler, dist, out / "dense",
                          data.num_classes, loss_fn, progress=args.progress, name="dense",
                          fingerprint=cli.fingerprint(args, data.description, *RUN_FLAGS[:-6]))
        if args.resume and trainer.checkpoint_path.exists():
            trainer.resume(read_checkpoint(trainer.checkpoint_path))
        say(f"training the dense model for {args.dense_epochs} epochs first")
        trainer.fit()
        del trainer  # releases its DDP wrapper before the search wraps the model again
    elif dense_file.exists():
        try:
            model.load_state_dict(load_file(str(dense_file)))
        except RuntimeError as e:
            raise UserError(f"{dense_file} does not fit --model {args.model}: {str(e).splitlines()[1].strip()}"
                            ) from None

    recipe = Recipe(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, sched="constant", **common)
    check_recipe(recipe)
    dense_eval = evaluate(model, val_loader, dist)
    if dist.is_main and not dense_file.exists():
        dense_state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()}
        # (a kill midway: no half file) The data config the dense model was trained with rides in the metadata.
        meta = {"pretrained_cfg": json.dumps(plain_cfg(model.pretrained_cfg))}
        atomic_write(dense_file, lambda tmp: save_file(dense_state, str(tmp), metadata=meta))
    say(f"dense model: top-1 {dense_eval['top1']:.2f}%, top-5 {dense_eval['top5']:.2f}%")

    # Phase 2: the search.
    # (--fused on a CPU: start_run said so once; the folded path computes the same function, without a warning)
    make_searchable(model, search=args.search, fused=fused)
    model.to(dist.device)
    budgets = all_budgets[0]

    def epoch_end(epoch: int, record: dict) -> None:
        if args.drop_tokens_below:
            record["dropped_token_slots"] = drop_tokens(model, args.drop_tokens_below)
            alive = alive_tokens(model)
            record["alive_tokens"] = sum(map(len, alive)) / (len(alive) * arch.num_patches)
        plan = threshold(model, *budgets)
        record["kept"] = plan.kept_fractions()
        record["head_widths"] = [list(b.head_dims) for b in plan.blocks]
        if dist.is_main:
            (out / "figures").mkdir(exist_ok=True)  # here, not at the start: an early error leaves no empty folder
            plot_gate_histograms(model, out / "figures" / f"gates_epoch{epoch:03d}.png", f"gates after epoch {epoch}")
            plot_structure(plan, out / "figures" / f"structure_epoch{epoch:03d}.png",
                           f"epoch {epoch}: structure at budgets {budgets}")

    extra = {"arch": arch.to_dict(), "family": family.name, "search": args.search, "model_name": args.model,
             "dense_eval": dense_eval, "dense_weights": str(dense_file.resolve()), "data": data.description,
             "classes": list(data.classes), "embedded": embedded, "mean_std": [list(mean), list(std)],
             "pretrained_cfg": plain_cfg(model.pretrained_cfg)}
    trainer = Trainer(model, recipe, train_loader, val_loader, sampler, dist, out, data.num_classes, loss_fn,
                      penalty=weights.penalty, epoch_end=epoch_end, checkpoint_extra=extra,
                      progress=args.progress, name="search",
                      fingerprint=cli.fingerprint(args, data.description, *RUN_FLAGS))
    if args.resume and trainer.checkpoint_path.exists():
        trainer.resume(read_checkpoint(trainer.checkpoint_path))
    say(f"searching ({args.search}) for {args.epochs} epochs, w1={args.w1:g} w2={args.w2:g} w3={args.w3:g}")
    trainer.fit()

    if dist.is_main:
        for b in all_budgets:
            plan = threshold(model, *b)
            path = out / f"plan_{b[0]:g}_{b[1]:g}_{b[2]:g}.json"
            path.write_text(plan.to_json(indent=1))
            say(f"wrote {path}")
        say(threshold(model, *budgets).summary())
    return 0


def _mean_std(model, embedded: bool):
    if embedded:
        return (DIGITS_MEAN,) * 3, (DIGITS_STD,) * 3
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
