"""Teacher probe: nearest-neighbour scores are exact, bank subsampling is bounded, the shipped
teacher's features separate synthetic defects, and the CLI compares feature sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efficientad.cli import main
from models.data import discover_dataset, load_batch
from models.feature_probe import ProbeSettings, knn_probe, knn_scores, teacher_features
from pipeline.tools.scene import generate_mvtec


def pooled_pixels(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 16)


@pytest.fixture(scope="module")
def probe_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe_data")
    return generate_mvtec(
        root, "flange", n_train=6, n_test_good=4, n_test_defect_per_type=2, seed=11
    )


def test_scores_equal_brute_force_nearest_neighbour(tiny_dataset):
    dataset = discover_dataset(tiny_dataset)
    scores, labels, kept, channels = knn_scores(pooled_pixels, dataset, ProbeSettings(batch=3))
    train = pooled_pixels(load_batch(dataset.train, (256, 256)))
    bank = train.permute(0, 2, 3, 1).reshape(-1, 3)
    test = pooled_pixels(load_batch(dataset.test, (256, 256))).permute(0, 2, 3, 1)
    expected = [
        float(torch.cdist(t.reshape(-1, 3).double(), bank.double()).amin(1).max()) for t in test
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [s.label for s in dataset.test]
    assert kept == len(bank) and channels == 3


def test_bank_is_subsampled_to_its_size(tiny_dataset):
    dataset = discover_dataset(tiny_dataset)
    full, *_ = knn_scores(pooled_pixels, dataset)
    scores, _, kept, _ = knn_scores(pooled_pixels, dataset, ProbeSettings(bank_size=100))
    assert kept == 100
    assert np.all(scores >= full - 1e-6)  # fewer neighbours can only be farther away


def test_a_test_set_without_defects_is_a_clear_error(tiny_dataset):
    dataset = discover_dataset(tiny_dataset)
    dataset.test = [s for s in dataset.test if s.label == 0]
    with pytest.raises(ValueError, match="normal and defective"):
        knn_probe(pooled_pixels, dataset)


@pytest.mark.slow
def test_shipped_teacher_features_separate_synthetic_defects(probe_dataset):
    result = knn_probe(teacher_features("shipped", "s"), discover_dataset(probe_dataset))
    assert result.feature_channels == 384 and result.bank_size == 6 * 56 * 56
    assert result.image_auroc >= 0.85, result


@pytest.mark.slow
def test_cli_reports_every_feature_source(tiny_dataset, capsys):
    code = main(
        [
            "probe-teacher",
            "--data",
            str(tiny_dataset),
            "--teacher",
            "shipped",
            "--teacher",
            "random",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["mean_image_auroc"]) == {"teacher:shipped", "teacher:random"}
    assert {r["dataset"] for r in report["results"]} == {tiny_dataset.name}
    assert all(0.0 <= r["image_auroc"] <= 1.0 for r in report["results"])


def test_cli_rejects_an_unknown_target_backbone(tiny_dataset, capsys):
    code = main(["probe-teacher", "--data", str(tiny_dataset), "--target", "vgg99"])
    assert code == 2
    assert "unknown backbone 'vgg99'" in capsys.readouterr().err
