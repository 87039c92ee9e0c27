"""timm's own model tests (tests/test_models.py of pytorch-image-models, unchanged) on vitslim slim models.

    python -m benchmarks.timm_model_tests PATH/TO/pytorch-image-models/tests/test_models.py [-o DIR] [--source S]

Registers slim models in timm's registry as timm registers its ViTs (entrypoint, default config, the
vision_transformer module, so the intermediates and features tests select them): slimmed at 70/70 budgets from
deit_tiny_patch16_224, deit_tiny_distilled_patch16_224 and vit_small_patch14_reg4_dinov2 (random gates, seed 0),
every token kept or 70% of them. Then runs the test file on them and on their dense models (what needs no download),
and writes the counts to DIR/timm_model_tests.json (default benchmarks/results) with versions. Loaded as a pytest
plugin (-p benchmarks.timm_model_tests) it only registers the models.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import timm
import torch
from timm.models import generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet

import vitslim

ROOT = Path(__file__).resolve().parent.parent
BASES = {"deit_tiny": "deit_tiny_patch16_224", "deit_tiny_distilled": "deit_tiny_distilled_patch16_224",
         "small_reg4_dinov2": "vit_small_patch14_reg4_dinov2"}
TOKENS = {"kept": 1.0, "dropped": 0.7}
# timm's ViT names start "vit_" (its test of non-standard models selects them so); "vitslim" marks ours.
NAMES = {f"vit_vitslim_{short}_{tokens}": (base, budget) for short, base in BASES.items()
         for tokens, budget in TOKENS.items()}
REGISTRY_MODULE = "benchmarks.timm_model_tests_registry.vision_transformer"
FEATURE_ARGS = ("features_only", "out_indices", "feature_cls", "output_fmt", "norm", "feature_cfg")


def slim_model(base: str, budget_tokens: float, **kwargs) -> torch.nn.Module:
    """A slim model of timm's `base` at 70/70 budgets and `budget_tokens`: random gates (seed 0), not trained."""
    features = {k: kwargs.pop(k) for k in FEATURE_ARGS if k in kwargs}
    dense = timm.create_model(base, pretrained=False, **kwargs)
    searchable = vitslim.make_searchable(dense)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in vitslim.gates(searchable):
            for p in (gate.attn, gate.mlp, gate.tokens):
                p.copy_(torch.empty(p.shape).uniform_(0.0, 2.0, generator=g))
    slim = vitslim.slim(searchable, vitslim.threshold(searchable, 0.7, 0.7, budget_tokens))
    slim.feature_info = dense.feature_info
    if features.pop("features_only", False):  # as timm's builder wraps a ViT: feature_cls "getter", 3 blocks
        features.pop("feature_cls", None)
        features.pop("feature_cfg", None)
        net = FeatureGetterNet(slim, **{"out_indices": 3, **features})
        net.pretrained_cfg = net.default_cfg = pretrained_cfg_for_features(slim.pretrained_cfg)
        return net
    return slim


def _register() -> None:
    """Register every slim model as timm registers its own: from a module whose short name is vision_transformer
    (timm's intermediates and features tests select models by module) holding their default_cfgs (the tests of
    name_matches_cfg models: backward, TorchScript, default configs, FX backward)."""
    module = types.ModuleType(REGISTRY_MODULE)
    sys.modules[REGISTRY_MODULE] = module
    cfgs = {}
    for name, (base, _) in NAMES.items():
        cfg = timm.models.get_pretrained_cfg(base).to_dict()
        cfgs[name] = {k: v for k, v in cfg.items() if k not in ("hf_hub_id", "url", "file", "tag", "architecture")}
    module.default_cfgs = generate_default_cfgs(cfgs)
    for name, (base, budget) in NAMES.items():
        def entrypoint(pretrained: bool = False, _base=base, _budget=budget, **kwargs):
            if pretrained:
                raise ValueError("vitslim's registered slim models have no pretrained weights")
            return slim_model(_base, _budget, **kwargs)
        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = REGISTRY_MODULE
        setattr(module, name, entrypoint)
        register_model(entrypoint)


if not any(name in timm.list_models() for name in NAMES):
    _register()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_file", type=Path, help="pytorch-image-models' tests/test_models.py")
    parser.add_argument("-o", "--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--source", default=None, help="where the test file came from (recorded), e.g. a commit")
    args = parser.parse_args(argv)
    counts = {}
    # The dense models under their own names; their pretrained tags (fb_in1k, lvd142m) need a download.
    dense = f"({' or '.join(BASES.values())}) and not vitslim and not fb_in1k and not lvd142m"
    for label, selection in (("dense", dense), ("slim", "vitslim")):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.timm_model_tests", "-p", "no:cacheprovider",
                   str(args.test_file), "-k", selection, "-rfs"]
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
        counts[label] = {"summary": summary, "failed": re.findall(r"^FAILED (\S+)", run.stdout, re.M)}
        print(f"{label}: {summary}")
    digest = hashlib.sha256(args.test_file.read_bytes()).hexdigest()[:16]
    record = {"what": "timm's tests/test_models.py on slim models registered in timm's registry", "counts": counts,
              "test_file": {"path": str(args.test_file), "sha256": digest, "source": args.source},
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0]}}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "timm_model_tests.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
