"""benchmarks.loader: the synthetic JPEGs look like ImageNet's, the per-stage times cover the real transform,
and the results file says how many cores the predicted step rates need."""
import json

from PIL import Image

from benchmarks import loader


def test_synthetic_jpegs_are_imagenet_like(tmp_path):
    root = loader.synthetic_jpegs(tmp_path, 14, classes=2)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 14 and len(list((root / "val").rglob("*.jpg"))) == 2
    sizes = {Image.open(f).size for f in files}
    assert sizes <= set(loader.SIZES) and len(sizes) == len(loader.SIZES)
    assert all(15_000 < f.stat().st_size < 400_000 for f in files)  # photo-like, not noise or flat colour
    assert loader.synthetic_jpegs(tmp_path, 14, classes=2) == root  # generated once


def test_the_benchmark_writes_stages_rates_and_cores_needed(tmp_path, capsys):
    assert loader.main(["--synthetic", "24", "--workers", "1", "--batch-size", "4", "--batches", "2",
                        "--stage-samples", "6", "--step-rate", "9000", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "loader.json").read_text())
    before, default, gpu = result["pipelines"].values()
    for pipeline in (before, default):
        stages = pipeline["stages_ms_per_image"]
        assert "decode (PIL open + RGB)" in stages and any("RandAugment" in k for k in stages)
        assert any("RandomResizedCrop" in k for k in stages) and "collate" in stages
    assert any("RandomErasing" in k for k in before["stages_ms_per_image"])  # in the workers before
    assert not any("RandomErasing" in k for k in default["stages_ms_per_image"])  # on the device now
    assert set(gpu["stages_ms_per_image"]) == {"read file + header (+ Pillow for non-JPEG)",
                                               "draw crop, flip, RandAugment, erasing", "collate"}
    device_rates = gpu["device_side"]["images_per_s"]
    assert gpu["device_side"]["decoder"] == "torchvision" and set(device_rates) == {
        "decode + augment + normalise", "decode only"} and all(r > 0 for r in device_rates.values())
    assert [r["workers"] for r in result["rows"]] == [1, 1, 1] and all(r["images_per_s"] > 0 for r in result["rows"])
    need = result["feeding"]["--step-rate"]
    fastest = result["pipelines"][result["feeding_pipeline"]]
    assert fastest["per_core"] == max(p["per_core"] for p in (before, default, gpu))
    assert need["cores_needed"] == need["images_per_s"] / fastest["per_core"]
    assert "cores at" in capsys.readouterr().out


def _roofline(batch: int, ms: dict[str, dict[str, float]]) -> dict:
    return {"comparisons": [{"what": f"m {what} (fwd + bwd)", "batch": batch,
                             "paths": {path: {"predicted_ms_with_launches": t} for path, t in paths.items()}}
                            for what, paths in ms.items()]}


def test_the_epoch_time_model_takes_the_slower_of_step_and_loader(tmp_path, capsys):
    from benchmarks import epoch_time

    (tmp_path / "roofline.json").write_text(json.dumps(_roofline(256, {
        "search step": {"fused": 25.6, "folded": 51.2}, "retrain step": {"slim": 12.8, "dense": 25.6}})))
    (tmp_path / "loader.json").write_text(json.dumps({"cores": 2, "device": "cpu", "date": "today", "pipelines": {
        "slow (before)": {"per_core": 100.0},
        "--loader gpu: x": {"per_core": 2000.0, "device_side": {
            "device": "cpu", "decoder": "torchvision", "images_per_s": {"decode + augment + normalise": 5.0}}}}}))
    assert epoch_time.main(["--cores", "11", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "epoch_time.json").read_text())["rows"]
    search, retrain, base_search, _ = rows
    # DeiT-S search: the step takes 10,000 images/s; 10 workers give 1,000 (slow) or 20,000 (gpu).
    slow, gpu = search["by_loader"]["slow (before)"], search["by_loader"]["--loader gpu: x"]
    assert slow["bound"] == "loader" and slow["gpu_hours"] == 50 * epoch_time.IMAGENET_TRAIN / 1000 / 3600
    assert gpu["bound"] == "step" and gpu["images_per_s"] == 10_000 and gpu["gpu_time_not_counted"]
    assert retrain["by_loader"]["--loader gpu: x"]["images_per_s"] == 20_000  # the loader: 20,000 < 20,000 step
    assert base_search["step"] is None and base_search["paper_gpu_hours"] == 71  # no DeiT-B roofline here
    out = capsys.readouterr().out
    assert "| DeiT-B search, 50 epochs | not computed |" in out and "+ GPU decode" in out


def test_the_epoch_time_model_adds_the_gpus_decode_time_when_measured(tmp_path):
    from benchmarks import epoch_time

    (tmp_path / "roofline.json").write_text(json.dumps(_roofline(256, {"search step": {"fused": 25.6}})))
    (tmp_path / "loader.json").write_text(json.dumps({"cores": 16, "device": "NVIDIA H200", "pipelines": {
        "--loader gpu: x": {"per_core": 2000.0, "device_side": {
            "device": "cuda", "decoder": "torchvision", "images_per_s": {"decode + augment + normalise": 40_000}}}}}))
    assert epoch_time.main(["--results-dir", str(tmp_path)]) == 0
    search = json.loads((tmp_path / "epoch_time.json").read_text())["rows"][0]["by_loader"]["--loader gpu: x"]
    assert search["images_per_s"] == 1 / (1 / 10_000 + 1 / 40_000) and not search["gpu_time_not_counted"]


def test_the_epoch_time_table_goes_between_the_readme_markers(tmp_path):
    from benchmarks import epoch_time

    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{epoch_time.README_BEGIN}\nold\n{epoch_time.README_END}\nafter\n")
    epoch_time.update_readme("| new |\n", readme)
    assert readme.read_text() == f"before\n{epoch_time.README_BEGIN}\n| new |\n{epoch_time.README_END}\nafter\n"


def test_too_few_images_for_the_timed_batches_is_one_line(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as exit_:
        loader.main(["--synthetic", "12", "--workers", "1", "--batch-size", "8", "--batches", "1",
                     "--pipelines", "default", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "12 training images make 1 batches of 8; the timing takes 2 (a warm-up and " \
        "--batches 1): give at least 16 images" in err, err
    assert not (tmp_path / "loader.json").exists()
