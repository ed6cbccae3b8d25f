"""Accuracy benchmark orchestration: category discovery and order, tables, JSON, failure handling.

Training itself is the lead's module and far too slow for a unit test on CPU, so ``train`` is
replaced by one that saves a real (random-weight, calibrated) checkpoint; loading, evaluation,
tables and JSON run for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models.train
from models.accuracy import AccuracyConfig, find_categories, markdown_tables, run_accuracy
from models.checkpoint import save_checkpoint
from models.data import DataError
from models.networks import EfficientAD
from pipeline.tools.scene import generate_mvtec


def fake_train(calls: list):
    def train(cfg):
        calls.append(cfg)
        if cfg.data.name == "broken":
            raise RuntimeError("simulated training failure")
        torch.manual_seed(cfg.seed)
        model = EfficientAD(cfg.model_size)
        model.mean_std.std.fill_(1.0)
        model.quantiles.qb_st.fill_(1.0)
        model.quantiles.qb_ae.fill_(1.0)
        meta = {
            "name": cfg.data.name,
            "version": "t",
            "image_size": list(cfg.image_size),
            "threshold": 0.5,
            "score_min": 0.0,
            "score_max": 1.0,
        }
        return save_checkpoint(model, meta, cfg.out)

    return train


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mvtec")
    for name in ("zipper", "carpet"):
        generate_mvtec(base, name, n_train=1, n_test_good=1, n_test_defect_per_type=0, seed=1)
        generate_mvtec(
            base / "defects", name, n_train=1, n_test_good=0, n_test_defect_per_type=1, seed=2
        )
        # one defective image per category is enough: copy the "spot" type over
        spot = base / "defects" / name / "test" / "spot"
        (base / name / "test" / "spot").mkdir(parents=True)
        (base / name / "ground_truth" / "spot").mkdir(parents=True)
        (base / name / "test" / "spot" / "000.png").write_bytes((spot / "000.png").read_bytes())
        (base / name / "ground_truth" / "spot" / "000_mask.png").write_bytes(
            (base / "defects" / name / "ground_truth" / "spot" / "000_mask.png").read_bytes()
        )
    return base


def test_find_categories_orders_mvtec_canonically(tmp_path):
    for name in ("zipper", "bottle", "carpet", "metal_nut"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    assert [p.name for p in find_categories(tmp_path)] == [
        "carpet",
        "bottle",
        "metal_nut",
        "zipper",
    ]
    assert [p.name for p in find_categories(tmp_path, ["Metal Nut", "zipper"])] == [
        "metal_nut",
        "zipper",
    ]
    (tmp_path / "aaa_custom" / "train" / "good").mkdir(parents=True)
    assert [p.name for p in find_categories(tmp_path)] == [
        "aaa_custom",
        "bottle",
        "carpet",
        "metal_nut",
        "zipper",
    ]
    assert find_categories(tmp_path / "bottle") == [tmp_path / "bottle"]
    with pytest.raises(DataError, match="available"):
        find_categories(tmp_path, ["pill"])
    with pytest.raises(DataError, match="no category"):
        find_categories(tmp_path / "notes")


def test_run_benchmark_end_to_end(root, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    calls: list = []
    monkeypatch.setattr(models.train, "train", fake_train(calls))
    (root / "broken" / "train" / "good").mkdir(parents=True, exist_ok=True)
    (root / "broken" / "train" / "good" / "0.png").write_bytes(
        (root / "carpet" / "train" / "good" / "000.png").read_bytes()
    )
    config = AccuracyConfig(
        root=root,
        out_dir=tmp_path / "runs",
        categories=None,
        model_sizes=["s"],
        steps=7,
        seed=42,
        device="cpu",
        json_path=tmp_path / "bench.json",
    )
    lines: list[str] = []
    result = run_accuracy(config, report=lines.append)

    assert [c.data.name for c in calls] == ["broken", "carpet", "zipper"]
    assert all(c.steps == 7 and c.seed == 42 and c.model_size == "s" for c in calls)
    assert result.categories == ["broken", "carpet", "zipper"]  # not all MVTec: disk order
    assert result.failed
    assert "simulated training failure" in result.results["s"]["broken"]["error"]
    carpet = result.results["s"]["carpet"]
    assert 0.0 <= carpet["image_auroc"] <= 1.0 and carpet["au_pro"] is not None
    assert carpet["evaluation"]["dataset"]["name"] == "carpet"
    assert any("FAILED" in line for line in lines)

    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["results"]["s"]["zipper"]["image_f1"] == pytest.approx(
        result.results["s"]["zipper"]["image_f1"]
    )
    average = (carpet["image_auroc"] + result.results["s"]["zipper"]["image_auroc"]) / 2
    assert payload["averages"]["s"]["image_auroc"] == pytest.approx(average)

    tables = markdown_tables(result)
    assert "### Image-Level AUC" in tables and "### Image F1 Score" in tables
    auc_table = tables.split("### Image F1 Score")[0]
    header = next(line for line in auc_table.splitlines() if "Avg" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "",
        "Avg",
        "broken",
        "Carpet",
        "Zipper",
    ]
    row = next(line for line in auc_table.splitlines() if line.startswith("| EfficientAd-S"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{average:.3f}" and cells[2] == "err"
    assert cells[3] == f"{carpet['image_auroc']:.3f}"
