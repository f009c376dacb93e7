"""Shared fixtures: a small demo test set, tiny timm checkpoints, pipeline files."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py holds test factories
# Forward-tuning decisions (kaggle_tta.exec.decisions) go to a store of this test session's, not to
# the user's ~/.cache: every session times afresh, and tests never see a developer's records.
# Removed when the session ends (inductor's programs are kept there too).
os.environ["KAGGLE_TTA_TUNING_DIR"] = tempfile.mkdtemp(prefix="kaggle-tta-tuning-")
atexit.register(shutil.rmtree, os.environ["KAGGLE_TTA_TUNING_DIR"], True)
# Test modules that import albumentations before kaggle_tta (the oracles) would ask PyPI for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CLASSES = ["circle", "square", "triangle", "cross"]
N_IMAGES = 24


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    from kaggle_tta.demo.generate import write_split

    out = tmp_path_factory.mktemp("demo") / "test"
    write_split(out, N_IMAGES, seed=7, size=64)
    return out


def save_random_checkpoint(path: Path, arch: str, seed: int, n_classes: int = len(CLASSES)) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=n_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {
        "test_resnet": save_random_checkpoint(d / "test_resnet.safetensors", "test_resnet", 0),
        "test_efficientnet": save_random_checkpoint(d / "test_efficientnet.safetensors", "test_efficientnet", 1),
    }


def base_pipeline(images: Path, checkpoints: dict[str, Path], tmp: Path) -> dict:
    pre = {"input_size": [3, 56, 56], "crop_pct": 0.875}
    return {
        "task": "classification",
        "data": {"folder": str(images), "classes": CLASSES, "labels": {"path": str(images / "labels.csv")}},
        "runtime": {"device": "cpu", "precision": "fp32", "forward_batch": 16, "batch_size": 8, "workers": 0},
        "cache": {"dir": str(tmp / "cache")},
        "members": [
            {
                "name": "a",
                "arch": "test_resnet",
                "checkpoint": str(checkpoints["test_resnet"]),
                "preprocess": dict(pre),
                "tta": "hflip",
            },
            {
                "name": "b",
                "arch": "test_efficientnet",
                "checkpoint": str(checkpoints["test_efficientnet"]),
                "preprocess": dict(pre),
                "tta": "d4",
            },
        ],
        "blends": [{"name": "ens", "inputs": ["a", "b"], "method": "mean", "weights": [1, 1]}],
        "submission": {"path": str(tmp / "submission.csv")},
    }


@pytest.fixture
def pipeline(demo_images, checkpoints, tmp_path):
    """Returns (write(cfg) -> path, a fresh copy of the base pipeline dict)."""

    def write(cfg: dict, name: str = "pipeline.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return p

    return write, copy.deepcopy(base_pipeline(demo_images, checkpoints, tmp_path))


@pytest.fixture
def trials_always(monkeypatch):
    """Chunk-size and layout trials run however small the test set (by default a run must
    forward ChunkSizer.REPAY times the trial's inputs to time anything)."""
    from kaggle_tta.exec.chunks import ChunkSizer

    monkeypatch.setattr(ChunkSizer, "REPAY", 0)
