"""End-to-end evaluation and prediction with a real InferenceEngine (small random-weight model).

The model is untrained, so the numbers are not good; what is checked is that every reported
number is the one recomputed independently from the engine's own outputs and the masks on disk.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from efficientad.cli import build_parser
from models import evaluate as evaluate_module
from models.checkpoint import save_checkpoint
from models.data import DataError, discover_dataset, load_mask, load_rgb
from models.evaluate import evaluate
from models.inference import InferenceEngine, ModelInfo
from models.metrics import best_f1, pixel_metrics
from models.networks import EfficientAD
from models.predict import collect_images, output_names, predict_paths
from pipeline.tools.scene import generate_mvtec

SIZE = (256, 256)


def pairwise_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def random_model() -> EfficientAD:
    torch.manual_seed(0)
    model = EfficientAD("s")
    model.mean_std.mean.zero_()
    model.mean_std.std.fill_(1.0)
    for name in ("qa_st", "qa_ae"):
        getattr(model.quantiles, name).fill_(0.0)
    for name in ("qb_st", "qb_ae"):
        getattr(model.quantiles, name).fill_(1.0)
    return model.eval()


INFO = ModelInfo(
    name="random-s",
    version="0",
    sha256="0" * 64,
    image_size=SIZE,
    threshold=0.0,
    score_min=0.0,
    score_max=1.0,
)


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    torch.set_num_threads(1)
    model = random_model()
    probe = InferenceEngine.from_model(model, INFO, device="cpu")
    # a threshold inside the score range, so both labels occur
    rng = np.random.default_rng(0)
    scores = probe.predict_images([rng.integers(0, 255, (256, 256, 3), np.uint8)]).scores
    info = ModelInfo(**{**INFO.__dict__, "threshold": float(scores[0])})
    return InferenceEngine.from_model(model, info, device="cpu")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return generate_mvtec(
        root, "flange", n_train=1, n_test_good=2, n_test_defect_per_type=1, size=SIZE, seed=3
    )


@pytest.fixture(scope="module")
def report(engine, dataset_root):
    return evaluate(engine, discover_dataset(dataset_root), batch_size=4)


def test_evaluate_reports_what_the_engine_and_masks_say(engine, dataset_root, report):
    dataset = discover_dataset(dataset_root)

    # recompute everything image by image
    samples = dataset.test
    singles = [engine.predict_images([load_rgb(s.path)]) for s in samples]
    scores = np.array([p.scores[0] for p in singles], np.float64)
    maps = np.stack([p.maps[0] for p in singles])
    masks = np.stack([load_mask(s, SIZE) for s in samples])
    labels = [s.label for s in samples]

    assert [r.path for r in report.images] == [
        s.path.relative_to(dataset_root).as_posix() for s in samples
    ]
    assert np.allclose([r.score for r in report.images], scores, rtol=1e-4, atol=1e-6)
    overall = report.overall
    assert (overall.n_good, overall.n_defective) == (2, 4)
    assert overall.image_auroc == pytest.approx(pairwise_auroc(scores, labels))
    f1, _threshold = best_f1(scores, labels)
    assert overall.image_f1 == pytest.approx(f1)
    expected_pixels = pixel_metrics(maps, masks, 0.3)
    assert overall.pixel_auroc == pytest.approx(expected_pixels.auroc, abs=1e-4)
    assert overall.au_pro == pytest.approx(expected_pixels.au_pro, abs=1e-4)
    at = overall.at_model_threshold
    predicted = scores >= engine.info.threshold
    assert at.true_positives == int(np.sum(predicted & (np.array(labels) == 1)))
    assert at.false_positives == int(np.sum(predicted & (np.array(labels) == 0)))

    assert sorted(report.per_type) == ["crack", "missing", "scratch", "spot"]
    for name, metrics in report.per_type.items():
        subset = [i for i, s in enumerate(samples) if s.label == 0 or s.defect_type == name]
        assert (metrics.n_good, metrics.n_defective) == (2, 1)
        assert metrics.image_auroc == pytest.approx(
            pairwise_auroc(scores[subset], [labels[i] for i in subset])
        )
        expected = pixel_metrics(maps[subset], masks[subset], 0.3)
        assert metrics.au_pro == pytest.approx(expected.au_pro, abs=1e-4)

    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["dataset"]["fingerprint"] == dataset.fingerprint()
    assert payload["model"]["name"] == "random-s"
    text = report.to_text()
    for row in ("overall", "crack", "missing", "scratch", "spot", "AU-PRO"):
        assert row in text


@pytest.fixture(scope="module")
def partial_root(dataset_root, tmp_path_factory) -> Path:
    """good + spot (with masks) + crack (masks removed)."""
    root = tmp_path_factory.mktemp("partial") / "flange"
    shutil.copytree(dataset_root, root)
    shutil.rmtree(root / "ground_truth" / "crack")
    for kind in ("missing", "scratch"):
        shutil.rmtree(root / "test" / kind)
    return root


def test_evaluate_types_without_masks_in_memory_and_memory_mapped(
    engine, partial_root, model_dir, tmp_path, monkeypatch, capsys
):
    report = evaluate(engine, discover_dataset(partial_root))
    crack, spot = report.per_type["crack"], report.per_type["spot"]
    assert crack.pixel_auroc is None and crack.au_pro is None
    assert "no ground-truth masks" in crack.notes[0]
    assert crack.image_auroc is not None
    assert spot.pixel_auroc is not None and spot.au_pro is not None
    assert report.overall.pixel_auroc is not None
    assert "crack" in report.overall.notes[0]

    # the CLI, with maps forced into a memory-mapped file, reports the same numbers
    monkeypatch.setattr(evaluate_module, "IN_MEMORY_LIMIT_BYTES", 0)
    out = tmp_path / "eval.json"
    assert (
        run_cli(
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(partial_root),
            "--device",
            "cpu",
            "--json",
            str(out),
        )
        == 0
    )
    assert "overall" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["model"]["name"] == "random-s" and len(payload["images"]) == 4
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert payload["overall"][key] == pytest.approx(getattr(report.overall, key), abs=1e-5)
        assert payload["per_type"]["spot"][key] == pytest.approx(getattr(spot, key), abs=1e-5)

    empty = discover_dataset(partial_root)
    empty.test = []
    with pytest.raises(DataError, match="no test images"):
        evaluate(engine, empty)


def test_predict_paths_writes_maps_and_overlays(engine, dataset_root, tmp_path):
    odd = tmp_path / "odd" / "000.png"  # same stem as a test image, other size
    odd.parent.mkdir()
    image = cv2.imread(str(dataset_root / "test" / "crack" / "000.png"))
    cv2.imwrite(str(odd), cv2.resize(image, (300, 200)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [dataset_root / "test" / "crack" / "000.png", odd, broken]
    results = predict_paths(engine, paths, tmp_path / "maps", tmp_path / "over", batch_size=2)

    assert [Path(r.map_path).name for r in results[:2]] == ["000.npy", "000-2.npy"]
    assert results[2].error is not None and "broken.png" in results[2].error
    assert results[2].label == "error"
    for r in results[:2]:
        raw = np.load(r.map_path)
        assert raw.shape == SIZE and raw.dtype == np.float32
        assert float(raw.max()) == pytest.approx(r.score, rel=1e-5)
        assert r.label == ("anomalous" if r.score >= engine.info.threshold else "good")
        assert 0.0 <= r.normalized <= 1.0
    overlay = cv2.imread(results[1].overlay_path)
    assert overlay.shape == (200, 300, 3)  # original size, not model size
    direct = engine.predict_images([load_rgb(odd)])
    assert results[1].score == pytest.approx(float(direct.scores[0]), rel=1e-5)


def test_collect_images_and_names(tmp_path, dataset_root):
    found = collect_images([dataset_root / "test" / "good", dataset_root / "test" / "spot"])
    assert [p.name for p in found] == ["000.png", "001.png", "000.png"]
    assert output_names(found) == ["000", "001", "000-2"]
    assert output_names([Path("a/x.png"), Path("b/x.png"), Path("x-2.png")]) == ["x", "x-3", "x-2"]
    with pytest.raises(DataError, match="does not exist"):
        collect_images([tmp_path / "nothing"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="image file extension"):
        collect_images([tmp_path / "notes.txt"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, engine) -> Path:
    out = tmp_path_factory.mktemp("model") / "random-s"
    meta = {
        "name": "random-s",
        "version": "0",
        "image_size": list(SIZE),
        "threshold": engine.info.threshold,
        "score_min": 0.0,
        "score_max": 1.0,
    }
    return save_checkpoint(random_model(), meta, out)


def run_cli(*argv: str) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_predict_and_bad_input(model_dir, dataset_root, tmp_path, capsys):
    torch.set_num_threads(1)
    out_json = tmp_path / "pred.json"
    code = run_cli(
        "predict",
        "--model",
        str(model_dir),
        str(dataset_root / "test" / "spot"),
        "--device",
        "cpu",
        "--json",
        str(out_json),
        "--maps-dir",
        str(tmp_path / "m"),
        "--overlay-dir",
        str(tmp_path / "o"),
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "000.png" in printed and "normalized" in printed
    payload = json.loads(out_json.read_text())
    assert payload["images"][0]["label"] in ("good", "anomalous")
    assert (tmp_path / "m" / "000.npy").is_file() and (tmp_path / "o" / "000.png").is_file()

    assert run_cli("eval", "--model", str(tmp_path / "nomodel"), "--data", str(dataset_root)) == 2
    assert run_cli("eval", "--model", str(model_dir), "--data", str(tmp_path / "nodata")) == 2
    assert run_cli("predict", "--model", str(model_dir), str(tmp_path / "missing.png")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_synth(tmp_path, capsys):
    assert (
        run_cli(
            "synth",
            "--out",
            str(tmp_path),
            "--train",
            "2",
            "--test-good",
            "1",
            "--test-defect",
            "1",
            "--size",
            "128",
            "--line",
            "12",
            "--episodes",
            "1",
            "--episode-length",
            "2",
            "3",
            "--episode-gap",
            "3",
            "--no-video",
        )
        == 0
    )
    assert len(discover_dataset(tmp_path / "synthetic_part").train) == 2
    labels = json.loads((tmp_path / "synthetic_part_line" / "labels.json").read_text())
    assert len(labels["frames"]) == 12 and len(labels["episodes"]) == 1
    assert run_cli("synth", "--out", str(tmp_path), "--train", "3", "--size", "128") == 2
    assert "overwrite" in capsys.readouterr().err
