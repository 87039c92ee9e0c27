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
