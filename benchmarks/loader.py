"""How fast the training input pipeline is on this machine, where its time goes, and how many cores it would take
to feed the predicted step rates. Writes benchmarks/results/loader.json.

  python -m benchmarks.loader --synthetic 2000           # ImageNet-like JPEGs generated once into a temp folder
  python -m benchmarks.loader --data-path /data/imagenet --workers 1 2 4 8 16
  python -m benchmarks.loader --synthetic 2000 --pipelines default gpu    # --loader cpu against --loader gpu

The pipeline is the one python -m vitslim.search and retrain build (vitslim.data.loaders: timm's DeiT transform with
RandAugment m9-mstd0.5, random erasing 0.25, bicubic RandomResizedCrop 224, per-sample seeds, the loader's
collate), so the numbers are what training gets. Per-stage times are per image on one core, in this process.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from .common import available_cores, write_results

RESULTS = Path(__file__).resolve().parent / "results"
# ImageNet-1k train JPEGs: typically 500 x 375 or 375 x 500 (~110 KB on average, most 40-150 KB).
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (640, 480), (400, 300))


def synthetic_jpegs(root: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (smooth colour fields with texture, quality 90, ImageNet's usual sizes) in
    root/train/<class>/ and a few in root/val/<class>/. Returns root; generated once per (count, seed)."""
    import numpy as np
    from PIL import Image, ImageFilter

    done = root / f".done-{count}-{seed}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(classes, count // 50))):
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.SMOOTH)
            pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
            folder = root / split / f"class{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return root


def stage_times(data, samples: int) -> dict[str, float]:
    """Milliseconds per image of each stage of the training transform (decode first), on one core."""
    from torch.utils.data import default_collate

    dataset = data.train  # vitslim.data.loaders.ImageFiles
    stages = list(getattr(dataset.transform, "transforms", [dataset.transform]))
    totals = {"decode (PIL open + RGB)": 0.0, **{_name(t, i): 0.0 for i, t in enumerate(stages)}}
    for index in range(samples):  # the files in the page cache first, as in a long epoch's steady state
        Path(dataset.samples[index % len(dataset.samples)][0]).read_bytes()
    outputs = []
    torch.manual_seed(0)
    for index in range(samples):
        path, _ = dataset.samples[index % len(dataset.samples)]
        start = time.perf_counter()
        image = dataset.folder.loader(path)
        totals["decode (PIL open + RGB)"] += time.perf_counter() - start
        for i, t in enumerate(stages):
            start = time.perf_counter()
            image = t(image)
            totals[_name(t, i)] += time.perf_counter() - start
        outputs.append((image, 0))
    batch = outputs[: min(len(outputs), 256)]
    start = time.perf_counter()
    default_collate(batch)
    totals["collate"] = (time.perf_counter() - start) * samples / len(batch)
    return {k: 1e3 * v / samples for k, v in totals.items()}


def _name(transform, index: int) -> str:
    name = type(transform).__name__
    if name == "RandAugment":
        name = "RandAugment (m9, 2 ops)"
    return f"{index + 1}. {name}"


def host_to_device_ms(batch_size: int) -> dict | None:
    """Milliseconds per image to copy a training batch (float32, 3 x 224 x 224) from pinned memory to the GPU."""
    if not torch.cuda.is_available():
        return None
    x = torch.randn(batch_size, 3, 224, 224).pin_memory()
    for _ in range(3):
        x.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        x.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    return {"ms_per_image": 1e3 * seconds / batch_size, "gb_per_s": x.numel() * 4 / seconds / 1e9}


def device_input_ms(data, batch_size: int) -> float:
    """Milliseconds per image of DeviceInput (normalise + erase a uint8 batch), on this process's CPU."""
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)
    boxes = torch.tensor([[10, 20, 80, 60]] * batch_size)
    cpu = torch.device("cpu")
    data.device_input(images, cpu, boxes, (0, 0, 0))
    start = time.perf_counter()
    for step in range(3):
        data.device_input(images, cpu, boxes, (0, 0, step))
    return 1e3 * (time.perf_counter() - start) / 3 / batch_size


def encoded_stage_times(data, samples: int) -> dict[str, float]:
    """--loader gpu's worker side, milliseconds per image on one core: read the file and its header, draw the
    augmentation (timm's transform, recorded), collate."""
    from vitslim.data.device import collate_encoded
    from vitslim.data.images import draw_erasing

    files = data.train  # vitslim.data.device.EncodedFiles
    totals = {"read file + header (+ Pillow for non-JPEG)": 0.0, "draw crop, flip, RandAugment, erasing": 0.0}
    for index in range(samples):
        Path(files.samples[index % len(files.samples)][0]).read_bytes()
    outputs = []
    for index in range(samples):
        start = time.perf_counter()
        file, label, bad, header = files._read(index % len(files.samples))
        middle = time.perf_counter()
        draw = files.draws(files.samples[index % len(files.samples)][0], header)
        box = torch.tensor(draw_erasing(files.erasing or 0.0, *files.draws.size))
        totals["draw crop, flip, RandAugment, erasing"] += time.perf_counter() - middle
        totals["read file + header (+ Pillow for non-JPEG)"] += middle - start
        outputs.append((file, label, bad, draw, box))
    batch = outputs[: min(len(outputs), 256)]
    start = time.perf_counter()
    collate_encoded(batch)
    totals["collate"] = (time.perf_counter() - start) * samples / len(batch)
    return {k: 1e3 * v / samples for k, v in totals.items()}


def device_pipeline_rate(data, batch_size: int, batches: int, device: torch.device) -> dict:
    """Images per second of --loader gpu's device half (decode, crop + resize, flip, RandAugment, normalise,
    erase) on `device`, and of its decode alone, over `batches` batches after one warm-up batch."""
    from vitslim.data.loaders import loaders
    from vitslim.distributed import Distributed

    dist = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train, _, sampler = loaders(data, batch_size, dist, 0, 0, say=lambda _: None)
    sampler.set_epoch(0)
    encoded = []
    for encoded_batch, _, _, boxes in train.loader:
        encoded.append((encoded_batch, boxes))
        if len(encoded) == batches + 1:
            break
    decode, sync = data.device_input.decode, (torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    rates = {}
    for what, run in (("decode + augment + normalise", lambda b, boxes, k: data.device_input(
                           b, device, boxes, (0, 0, k))),
                      ("decode only", lambda b, boxes, k: decode.decode(b, device))):
        run(*encoded[0], 0)
        sync()
        start = time.perf_counter()
        for k, (b, boxes) in enumerate(encoded[1:], 1):
            run(b, boxes, k)
        sync()
        rates[what] = sum(len(b.files) for b, _ in encoded[1:]) / (time.perf_counter() - start)
    return {"device": str(device), "decoder": decode.decoder.name, "images_per_s": rates}


def loader_rate(data, workers: int, batch_size: int, batches: int) -> float:
    """Images per second the training loader (vitslim.data.loaders) delivers with `workers` processes, after
    its first batch (worker start-up is excluded), before DeviceInput (which runs on the GPU in training)."""
    from vitslim.data.loaders import loaders
    from vitslim.distributed import Distributed

    dist = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train, _, sampler = loaders(data, batch_size, dist, 0, workers, say=lambda _: None)
    sampler.set_epoch(0)
    it = iter(train.loader)  # the batches as the workers deliver them (DeviceInput's work is the GPU's)
    next(it)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images = next(it)[0]
        seen += images.shape[0]
    rate = seen / (time.perf_counter() - start)
    del it
    return rate


def predicted_step_rates(step_rate: float | None) -> dict[str, float]:
    """Images per second the GPU would take: --step-rate, else benchmarks/results/roofline.json's DeiT-S search
    steps (predicted at the device limits with launch overheads; an estimate)."""
    if step_rate is not None:
        return {"--step-rate": step_rate}
    path = RESULTS / "roofline.json"
    if not path.is_file():
        return {}
    roofline = json.loads(path.read_text())
    search = next((c for c in roofline["comparisons"] if "search step" in c["what"]), None)
    if search is None:
        return {}
    return {f"{roofline['model']} search step, {name} (roofline, predicted)":
            search["batch"] / (p["predicted_ms_with_launches"] / 1e3) for name, p in search["paths"].items()}


PIPELINES = {"before": ("workers normalise + erase (float32 batches; before)", False, "cpu"),
             "default": ("device normalises + erases (uint8 batches; default, --loader cpu)", True, "cpu"),
             "gpu": ("--loader gpu: workers read + draw, the device decodes + augments", True, "gpu")}


def main(argv: list[str] | None = None) -> int:
    from vitslim.cli.common import positive_int
    from vitslim.data.images import Augment
    from vitslim.data.loaders import image_folders

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-path", help="train/ and val/ class folders")
    source.add_argument("--synthetic", type=positive_int("--synthetic"), metavar="N",
                        help="generate N ImageNet-like JPEGs (once)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader worker counts to time (default: 1, 2, 4, ... up to the cores)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=64)
    p.add_argument("--batches", type=positive_int("--batches"), default=8, help="timed batches per worker count")
    p.add_argument("--stage-samples", type=int, default=200, help="images for the per-stage times")
    p.add_argument("--pipelines", nargs="+", choices=tuple(PIPELINES), default=list(PIPELINES),
                   help="which pipelines to time (default: all)")
    p.add_argument("--step-rate", type=float, default=None, help="images/s to feed (default: the roofline's)")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--dry-run", action="store_true", help="recorded in the results: gpu_check's plumbing run")
    args = p.parse_args(argv)

    cores = available_cores()
    if args.synthetic is not None:
        # one folder per count: a folder shared by counts would hold the images of the largest one made so far
        root = synthetic_jpegs(Path(tempfile.gettempdir()) / f"vitslim-loader-jpegs-{args.synthetic}",
                               args.synthetic)
    else:
        root = Path(args.data_path)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    counts = args.workers or sorted({1, *[2 ** i for i in range(1, 8) if 2 ** i <= cores], cores})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, summary = [], {}
    for key in args.pipelines:
        label, on_device, loader = PIPELINES[key]
        data = image_folders(str(root), 224, mean, std, Augment(), on_device=on_device, loader=loader)
        needed = (args.batches + 1) * args.batch_size  # a warm-up batch, then the timed ones, in one epoch
        if len(data.train) < needed:
            p.error(f"{len(data.train)} training images make {len(data.train) // args.batch_size} batches of "
                    f"{args.batch_size}; the timing takes {args.batches + 1} (a warm-up and --batches "
                    f"{args.batches}): give at least {needed} images, or fewer --batches or a smaller --batch-size")
        if not summary:
            sizes = [Path(s).stat().st_size for s, _ in data.train.samples[:500]]
            print(f"data: {data.description}; mean JPEG {sum(sizes) / len(sizes) / 1e3:.0f} KB; {cores} cores here")
        torch.set_num_threads(1)  # one core, as a loader worker has
        if loader == "gpu":
            stages = encoded_stage_times(data, args.stage_samples)
        else:
            stages = stage_times(data, args.stage_samples)
            if data.device_input is not None:
                # (on a GPU this runs there, not in a core's budget; timed on this CPU only to show what moved)
                stages["on the device: normalise + erase (timed here on the CPU)"] = device_input_ms(
                    data, args.batch_size)
        total = sum(stages.values())
        print(f"{label}: per image on one core ({args.stage_samples} images): {total:.2f} ms, "
              f"{1e3 / total:.0f} images/s")
        for name, ms in stages.items():
            print(f"  {name:<58} {ms:7.3f} ms  {ms / total:6.1%}")
        torch.set_num_threads(cores)
        for workers in counts:
            rate = loader_rate(data, workers, args.batch_size, args.batches)
            rows.append({"pipeline": label, "workers": workers, "images_per_s": rate,
                         "images_per_s_per_worker": rate / workers})
            print(f"  loader, {workers:>2} workers: {rate:8.0f} images/s ({rate / workers:.0f} per worker)")
        summary[label] = {"stages_ms_per_image": stages, "stage_total_ms": total,
                          "per_core": max(r["images_per_s_per_worker"] for r in rows if r["pipeline"] == label)}
        if loader == "gpu":
            device_side = device_pipeline_rate(data, args.batch_size, args.batches, device)
            summary[label]["device_side"] = device_side
            where = "the GPU" if device.type == "cuda" else "this CPU (one process; on a GPU it runs there)"
            print("  its device half on " + where + ": " + ", ".join(
                f"{what} {rate:.0f} images/s" for what, rate in device_side["images_per_s"].items()))
    h2d = host_to_device_ms(args.batch_size)
    if h2d is not None:
        print(f"host-to-device (pinned, non-blocking, float32): {h2d['ms_per_image']:.3f} ms per image "
              f"({h2d['gb_per_s']:.1f} GB/s); uint8 batches move a quarter of that")
    fastest = max(summary, key=lambda label: summary[label]["per_core"])
    per_core = summary[fastest]["per_core"]
    needs = {name: {"images_per_s": rate, "cores_needed": rate / per_core}
             for name, rate in predicted_step_rates(args.step_rate).items()}
    side = summary[fastest].get("device_side")
    if side is not None:  # the GPU decodes and augments too: its time per image adds to the step's
        for n in needs.values():
            n["device_half"] = side
            n["note"] = (f"{fastest}: the GPU's time for the device half adds to the step time; measured here on "
                         f"{side['device']}")
    for name, n in needs.items():
        print(f"to feed {n['images_per_s']:.0f} images/s ({name}): {n['cores_needed']:.0f} cores at "
              f"{per_core:.0f} images/s per core ({fastest})")
    path = write_results("loader", rows, args.results_dir, data=data.description, cores=cores,
                         batch_size=args.batch_size, pipelines=summary, host_to_device=h2d, feeding=needs,
                         feeding_pipeline=fastest, dry_run=args.dry_run,
                         transform="vitslim.data: timm's DeiT transform (PIL), per-sample seeds")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
