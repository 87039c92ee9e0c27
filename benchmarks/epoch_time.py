"""The epoch-time model of the paper's recipe on one H200-class GPU: whichever is slower, the predicted training
step (benchmarks/roofline.py) or the loader (benchmarks/loader.py's images/s per core, times the cores), sets the
epoch; the recipe's epochs give its GPU-hours, beside the paper's.

    python -m benchmarks.epoch_time [--cores 16] [--readme]

Reads benchmarks/results/roofline.json (DeiT-S), roofline_deit_base_patch16_224.json (DeiT-B) and loader.json;
writes epoch_time.json and, with --readme, the README's table between its epoch-time markers. Every figure says
where it comes from: step rates are predicted (the roofline at the device limits, launches included), loader rates
are measured per core on the machine that ran benchmarks.loader and scaled to --cores minus one (the training
process keeps a core).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import between_markers, read_results, write_results
from benchmarks.roofline import results_name

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
README_BEGIN, README_END = "<!-- epoch-time:begin -->", "<!-- epoch-time:end -->"
IMAGENET_TRAIN = 1_281_167  # ImageNet-1k training images
# (model, its name here, stage, epochs, the roofline comparison, our path, the paper's GPU-hours on V100s)
RECIPES = (
    ("deit_small_patch16_224", "DeiT-S", "search", 50, "search step", "fused", 43.0),
    ("deit_small_patch16_224", "DeiT-S", "retrain", 300, "retrain step", "slim", None),
    ("deit_base_patch16_224", "DeiT-B", "search", 50, "search step", "fused", 71.0),
    ("deit_base_patch16_224", "DeiT-B", "retrain", 300, "retrain step", "slim", None),
)


def step_rates(results: Path, model: str, comparison: str) -> tuple[int, dict[str, float]] | None:
    """(batch, {path: predicted images/s}) of a roofline comparison, None when that roofline was not computed."""
    roofline = read_results(results / results_name(model))
    found = next((c for c in (roofline or {}).get("comparisons", []) if comparison in c["what"]), None)
    if found is None:
        return None
    return found["batch"], {name: found["batch"] / (p["predicted_ms_with_launches"] / 1e3)
                            for name, p in found["paths"].items()}


def model_rows(results: Path, cores: int) -> tuple[list[dict], dict]:
    loader = read_results(results / "loader.json")
    if loader is None:
        raise SystemExit("benchmarks/results/loader.json is missing: run python -m benchmarks.loader first")
    workers = max(1, cores - 1)
    pipelines = {label: {"per_core": p["per_core"], "images_per_s": p["per_core"] * workers,
                         "device_half": p.get("device_side")} for label, p in loader["pipelines"].items()}
    rows = []
    for model, short, stage, epochs, comparison, ours, paper in RECIPES:
        found = step_rates(results, model, comparison)
        row = {"model": model, "name": short, "stage": stage, "epochs": epochs, "paper_gpu_hours": paper,
               "step": None, "by_loader": {}}
        if found is not None:
            batch, rates = found
            row["step"] = {"batch": batch, "path": ours, "images_per_s": rates[ours], "baselines": rates}
            for label, p in pipelines.items():
                half = p["device_half"]
                step = rates[ours]
                on_gpu = bool(half) and half["device"].startswith("cuda")
                if on_gpu:  # the GPU decodes and augments too: its time per image adds to the step's
                    step = 1 / (1 / step + 1 / half["images_per_s"]["decode + augment + normalise"])
                rate = min(step, p["images_per_s"])
                epoch_s = IMAGENET_TRAIN / rate
                row["by_loader"][label] = {
                    "images_per_s": rate, "bound": "step" if step <= p["images_per_s"] else "loader",
                    "epoch_s": epoch_s, "gpu_hours": epochs * epoch_s / 3600,
                    "gpu_time_not_counted": bool(half) and not on_gpu}
        rows.append(row)
    return rows, {"cores": cores, "workers": workers, "measured_on": f"a {loader.get('cores')}-core machine "
                  f"(device {loader.get('device')}, {loader.get('date')})", "pipelines": pipelines}


def table(rows: list[dict], meta: dict) -> str:
    labels = list(meta["pipelines"])
    short = {label: short_name(label) for label in labels}
    lines = ["| recipe | step images/s (predicted) | " + " | ".join(
        f"{short[label]}: GPU-hours" for label in labels) + " | paper (V100) |",
        "| --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |"]
    for r in rows:
        what = f"{r['name']} {r['stage']}, {r['epochs']} epochs"
        if r["step"] is None:
            lines.append(f"| {what} | not computed | " + " | ".join("-" for _ in labels) + " | "
                         f"{_hours(r['paper_gpu_hours'])} |")
            continue
        cells = []
        for label in labels:
            b = r["by_loader"][label]
            extra = " + GPU decode" if b["gpu_time_not_counted"] else ""
            cells.append(f"{b['gpu_hours']:.1f} h{extra} ({b['bound']}-bound)")
        lines.append(f"| {what} | {r['step']['images_per_s']:,.0f} ({r['step']['path']}, batch "
                     f"{r['step']['batch']}) | " + " | ".join(cells) + f" | {_hours(r['paper_gpu_hours'])} |")
    lines += ["", f"Loader images/s with {meta['workers']} workers (of {meta['cores']} cores), from the images/s per "
                  f"core measured on {meta['measured_on']}: " + "; ".join(
                      f"{short[label]} {p['images_per_s']:,.0f} ({p['per_core']:.0f} per core)"
                      for label, p in meta["pipelines"].items()) + "."]
    if any(b["gpu_time_not_counted"] for r in rows for b in r["by_loader"].values()):
        lines += ["", "\"+ GPU decode\": --loader gpu's decode and augmentation run on the training GPU and add to "
                      "its step time; not counted here because they have not been timed on a GPU yet (`make "
                      "gpu-check` times them)."]
    return "\n".join(lines) + "\n"


def short_name(label: str) -> str:
    """A column name for one of benchmarks.loader's pipeline labels."""
    if label.startswith("--loader gpu"):
        return "--loader gpu"
    if "default" in label:
        return "--loader cpu (default)"
    if "before" in label:
        return "workers normalise (before)"
    return label


def _hours(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} h"


def update_readme(text: str, readme: Path = README) -> None:
    readme.write_text(between_markers(readme.read_text(), README_BEGIN, README_END, text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.epoch_time", description=__doc__.splitlines()[0])
    p.add_argument("--cores", type=int, default=16, help="CPU cores of the GPU machine (default: 16, the H200's)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = p.parse_args(argv)
    if args.cores < 1:
        p.error(f"--cores must be a positive integer, got {args.cores}")
    rows, meta = model_rows(args.results_dir, args.cores)
    text = table(rows, meta)
    print(text, end="")
    write_results("epoch_time", rows, args.results_dir, images=IMAGENET_TRAIN, **meta,
                  what="predicted epoch times: min(predicted step rate, measured loader rate per core x workers)")
    if args.readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
