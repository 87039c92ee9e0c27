"""python -m vitslim.plan: a plan from a search checkpoint for a FLOPs, parameter or latency target (or budgets),
with hardware-aligned widths; --sweep prints the trade-off table (and the searched model's top-1 with the pruned
entries removed, a quick accuracy proxy before retraining) and draws the curve.

  python -m vitslim.plan --searched runs/search/checkpoint.pt --target-flops 3.1G --align-heads 8 --align-mlp 64 \\
      -o plan.json
  python -m vitslim.plan --searched runs/search/checkpoint.pt --target-flops 0.9 0.8 0.7 0.6 0.5 --sweep
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..counting import count_flops, count_params
from ..data.loaders import Augment, embedded_digits, image_folders, input_on_device, loaders
from ..distributed import Distributed
from ..engine.checkpoints import checkpoint_file, load_search
from ..engine.trainer import evaluate
from ..errors import UserError
from ..latency import MAX_FIT_ERROR
from ..reporting.figures import plot_tradeoff
from ..slim import slim
from ..planning import Alignment, PlanCost, align_plan, masks_of, plan_for
from ..threshold import gate_ranking, threshold
from . import common as cli
from .common import ArgumentParser

SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def target_value(name: str):
    """'3.1G', '12M', '3.1e9' (a count) or '0.67' (a fraction of the dense model): a finite number > 0."""
    def parse(text: str) -> float:
        scale = SUFFIXES.get(text[-1:], 1.0)
        try:
            value = float(text[:-1] if scale != 1.0 else text) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number (3.1G, 12M, 3.1e9) or a fraction of the "
                                             f"dense model (0.67), got {text!r}") from None
        if not 0.0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value
    parse.range = "a finite number > 0 (a count, 3.1G, or a fraction of the dense model, 0.67)"
    return parse


def mix_type(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0.0 <= v < float("inf") for v in values) or not any(values):
        raise argparse.ArgumentTypeError(f"--mix must be 'attn,mlp,tokens', three numbers >= 0 not all 0, "
                                         f"got {text!r}")
    return values


mix_type.range = "'attn,mlp,tokens': three finite numbers >= 0, not all 0"


def add_target_args(g, sweep: bool) -> None:
    """--target-flops / --target-params / --target-latency-ms, --mix, --align-heads, --align-mlp (shared with
    python -m vitslim.retrain)."""
    many = dict(nargs="+") if sweep else {}
    g.add_argument("--target-flops", type=target_value("--target-flops"), default=None, metavar="MACS", **many,
                   help="MACs per image (3.1G) or a fraction of the dense model's (0.67)")
    g.add_argument("--target-params", type=target_value("--target-params"), default=None, metavar="N", **many,
                   help="parameters (12M) or a fraction of the dense model's (0.6)")
    g.add_argument("--target-latency-ms", type=target_value("--target-latency-ms"), default=None, metavar="MS",
                   **many, help="milliseconds per forward of --latency-batch-size images on this machine's GPU "
                                "(else CPU), from a latency table measured once and cached (VITSLIM_CACHE)")
    g.add_argument("--latency-batch-size", type=cli.positive_int("--latency-batch-size"), default=1)
    g.add_argument("--no-measure", action="store_true",
                   help="a latency target only from a cached table; never measure one")
    g.add_argument("--remeasure", action="store_true",
                   help="measure the latency table again (replacing the cached one: after a noisy measurement)")
    g.add_argument("--mix", type=mix_type, default=(1.0, 1.0, 1.0), metavar="A,M,T",
                   help="ratio of the pruned fractions of attention, MLP and tokens under a target; 0 keeps that "
                        "kind whole (default: 1,1,1)")
    g.add_argument("--align-heads", type=cli.positive_int("--align-heads"), default=1, metavar="N",
                   help="every kept head width a multiple of N (0 allowed; 8 suits tensor cores)")
    g.add_argument("--align-mlp", type=cli.positive_int("--align-mlp"), default=1, metavar="N",
                   help="every kept MLP width a multiple of N (64 suits tensor-core tiles)")


def chosen_target(args) -> tuple[str, object] | None:
    """(kind, value or values) of the one target given, None if none; UserError if several."""
    given = [(k, getattr(args, f"target_{k}")) for k in ("flops", "params", "latency_ms")
             if getattr(args, f"target_{k}") is not None]
    if len(given) > 1:
        raise UserError(f"give one target, got {' and '.join('--target-' + k.replace('_', '-') for k, _ in given)}")
    return given[0] if given else None


def make_plan(model, target: tuple[str, float] | None, budgets, mix, alignment, args=None, device=None,
              fused: bool = False):
    """The plan for a target (plan_for) or budgets (threshold), aligned when alignment is given. A latency
    target is for `device` (default: the GPU if there is one, else the CPU) at args.latency_batch_size."""
    if target is not None:
        latency = {}
        if target[0] == "latency_ms":
            device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model.to(device)
            latency = dict(device=device, batch_size=args.latency_batch_size, measure=not args.no_measure,
                           fused=fused, progress=True, remeasure=args.remeasure)
        return plan_for(model, **{target[0]: target[1]}, mix=mix, align=alignment, **latency)
    plan = threshold(model, *budgets)
    return align_plan(model, plan, alignment) if alignment is not None else plan


def alignment_of(args):
    return Alignment(args.align_heads, args.align_mlp) if (args.align_heads, args.align_mlp) != (1, 1) else None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vitslim.plan", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--searched", required=True, help="a search checkpoint (runs/search/checkpoint.pt)")
    g = p.add_argument_group("what to keep (one of)")
    add_target_args(g, sweep=True)
    g.add_argument("--budgets", type=cli.budgets_type, nargs="+", default=None, metavar="B",
                   help="kept fractions: 'b' or 'attn,mlp,tokens' (default without a target: 0.7)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", default=None, help="write the plan JSON here (one target or budget)")
    g.add_argument("--sweep", action="store_true",
                   help="one row per value of the target or --budgets: budgets, params, MACs, widths per block, "
                        "and the searched model's top-1 with the pruned entries removed")
    g.add_argument("--figure", default=None, help="--sweep: the trade-off curve PNG (default: next to --searched)")
    g = p.add_argument_group("accuracy proxy (--sweep)")
    g.add_argument("--data-path", default=None, help="train/ and val/ class folders (default: the search's "
                   "embedded data; without either, no accuracy column)")
    g.add_argument("--batch-size", type=cli.positive_int("--batch-size"), default=64)
    g.add_argument("--workers", type=cli.non_negative_int("--workers"), default=4)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = chosen_target(args)
    if target is not None and args.budgets is not None:
        raise UserError("give a target or --budgets, not both")
    values = target[1] if target is not None else (args.budgets or [cli.budgets_type("0.7")])
    if len(values) > 1 and not args.sweep:
        raise UserError(f"{len(values)} values need --sweep (one plan per value); without it give one")
    if args.sweep and args.output:
        raise UserError("-o writes one plan; --sweep writes a table and a figure")
    alignment = alignment_of(args)
    args.searched = str(checkpoint_file(args.searched))  # a run folder: its checkpoint.pt
    model, arch, ckpt = load_search(Path(args.searched))
    dense = {"flops": count_flops(model), "params": count_params(model)}
    ranking = gate_ranking(model)  # (read once: the gates do not change between the rows)
    cost = PlanCost(model, ranking.arch)
    rows = []
    if target is None:
        values = [b.for_model(arch) for b in values]
    for value in values:
        plan = make_plan(model, (target[0], value) if target else None, value, args.mix, alignment, args)
        rows.append({"value": value, "plan": plan, **_costs(ranking, cost, plan)})
    if not args.sweep:
        plan = rows[0]["plan"]
        print(plan.summary())
        print(_costs_line(rows[0], dense))
        if args.output:
            out = Path(args.output)
            if out.is_dir():
                raise UserError(f"-o {out} is a folder; give a file name (plan.json)")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(plan.to_json(indent=1) + "\n")
            print(f"wrote {out}")
        return 0

    accuracy = _accuracy_proxy(args, model, arch, ckpt)
    if accuracy is not None:
        for row in rows:
            row["top1"] = accuracy(row["plan"])
        dense_top1 = accuracy(None)
    else:
        dense_top1 = None
    print(format_sweep(rows, dense, dense_top1, target[0] if target else "budgets"))
    figure = Path(args.figure) if args.figure else Path(args.searched).parent / "figures" / "tradeoff.png"
    plot_tradeoff(rows, dense, dense_top1, figure)
    print(f"wrote {figure}")
    return 0


def _costs(ranking, cost, plan) -> dict:
    """The plan's MACs and parameters (cost: a PlanCost) and the fraction of the attention and MLP gate
    magnitude it keeps."""
    total = sum(float(t.sum()) for kind in ("attn", "mlp") for t in getattr(ranking, kind))
    return {**cost(plan), "kept_magnitude": _kept_magnitude(ranking, plan) / total if total else 0.0}


def _kept_magnitude(ranking, plan) -> float:
    """Summed |gate| of the attention and MLP entries the plan keeps."""
    masks = masks_of(plan, ranking)
    return sum(float(t[m].sum()) for kind in ("attn", "mlp") for t, m in zip(getattr(ranking, kind), masks[kind]))


def _costs_line(row: dict, dense: dict) -> str:
    plan = row["plan"]
    line = (f"cost: {row['flops'] / 1e9:.4f} GMACs ({row['flops'] / dense['flops']:.1%} of the dense model), "
            f"{row['params'] / 1e6:.3f}M parameters ({row['params'] / dense['params']:.1%})")
    if plan.target is not None:
        t = plan.target
        line += "; the target's budgets: " + ", ".join(f"{k} {v:.4f}" for k, v in plan.budgets.items())
    if plan.target is not None and plan.target["kind"] == "latency_ms":
        t = plan.target
        line += (f"\nlatency at batch {t['batch_size']} on {t['device']}: predicted {t['predicted_ms']:.3f} ms "
                 f"(target {t['value']:g} ms, dense model predicted {t['dense_predicted_ms']:.3f} ms), measured "
                 f"{t['measured_ms']:.3f} ms")
        if t.get("prediction_error", 0.0) > MAX_FIT_ERROR:
            line += (f"\nwarning: the measured latency is {t['prediction_error']:.0%} off the table's prediction "
                     f"(bound {MAX_FIT_ERROR:.0%}): the cached table is stale or this machine is busy; measure it "
                     f"again with --remeasure on a quiet machine")
    if plan.alignment is not None:
        a = plan.alignment
        moved = [f"{kind} {a[kind + '_moved_fraction']:.2%}" for kind in ("attn", "mlp")
                 if kind + "_moved_fraction" in a]
        line += (f"\nalignment: heads x{a['head']}, MLP x{a['mlp']}; gate magnitude moved by the rounding "
                 f"(dropped + added, of the unaligned plan's kept): {', '.join(moved) or 'none'}")
    return line


def _accuracy_proxy(args, model, arch, ckpt):
    """plan -> top-1 of the searched model with the pruned entries zeroed and tokens removed (the slim model
    with folded gates computes exactly that); None when there is no data to measure on."""
    if args.data_path is None and not ckpt.get("embedded", False):
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.data_path is None:
        data = embedded_digits(arch.img_size[0])
    else:
        mean, std = ckpt.get("mean_std", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        data = image_folders(args.data_path, arch.img_size[0], mean, std, Augment(),
                             on_device=input_on_device(device))
    dist = Distributed(rank=0, world_size=1, local_rank=0, device=device)
    _, val, _ = loaders(data, min(args.batch_size, len(data.train)), dist, 0, args.workers)

    def top1(plan) -> float:
        net = model if plan is None else slim(model, plan, fold_gates=True)
        return evaluate(net.to(device), val, dist)["top1"]
    return top1


def format_sweep(rows: list[dict], dense: dict, dense_top1, kind: str) -> str:
    """The paper-style table: one row per target or budget, the kept widths of each block under it."""
    head = f"{'target' if kind != 'budgets' else 'budgets':>14} {'attn':>6} {'mlp':>6} {'tokens':>6} " \
           f"{'params':>9} {'GMACs':>8} {'of dense':>8} {'|gate| kept':>11}" + (" top-1" if dense_top1 is not None
                                                                                else "")
    lines = [head, f"{'unpruned':>14} {1:>6.3f} {1:>6.3f} {1:>6.3f} {dense['params'] / 1e6:>8.3f}M "
                   f"{dense['flops'] / 1e9:>8.4f} {1:>8.1%} {1:>11.1%}"
             + (f" {dense_top1:5.2f}%" if dense_top1 is not None else "")]
    for row in rows:
        plan, b = row["plan"], row["plan"].budgets
        value = row["value"]
        label = (",".join(f"{v:g}" for v in value) if isinstance(value, tuple)
                 else f"{value:g}" if value <= 1 else f"{value / (1e9 if kind == 'flops' else 1e6):g}"
                 + ("G" if kind == "flops" else "M"))
        lines.append(f"{label:>14} {b['attn']:>6.3f} {b['mlp']:>6.3f} {b['tokens']:>6.3f} "
                     f"{row['params'] / 1e6:>8.3f}M {row['flops'] / 1e9:>8.4f} {row['flops'] / dense['flops']:>8.1%} "
                     f"{row['kept_magnitude']:>11.1%}" + (f" {row['top1']:5.2f}%" if "top1" in row else ""))
        lines.append(f"{'':>14} widths per block: attn {' '.join(str(x.attn_width) for x in plan.blocks)} | "
                     f"mlp {' '.join(str(len(x.mlp)) for x in plan.blocks)} | "
                     f"tokens {' '.join(str(len(x.tokens)) if 'tokens' in w.gates else 'all' for x, w in zip(plan.blocks, plan.block_widths))}")
    return "\n".join(lines)
