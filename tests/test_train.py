"""Training end to end: model directory contents, inference, the CLI, resume, thresholds.

Training runs are a few steps on tiny synthetic data (``tiny_model_dir`` in conftest.py is trained
once per session); they check the wiring and the calibration arithmetic, not detection quality.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from efficientad import __version__
from efficientad.cli import main
from models import train as train_module
from models.checkpoint import sha256_file
from models.data import DataError, discover_dataset, load_rgb, split_train_validation
from models.inference import InferenceEngine
from models.metrics import best_f1
from models.teacher import SHIPPED
from models.train import TrainConfig, pick_threshold, train
from models.training_state import has_training_state

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EFFICIENTAD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = {"steps": 1, "teacher": "shipped", "device": "cpu", "progress": False}
    return TrainConfig(data=data, out=out, **{**base, **kw})


# --------------------------------------------------------------------------------------------
# the trained model directory


def test_model_dir_records_everything_inference_and_audits_need(tiny_model_dir, tiny_dataset):
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    assert meta["format"] == "efficientad-line/model"
    assert meta["package_version"] == __version__
    assert meta["weights_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert meta["model_size"] == "s" and meta["image_size"] == [256, 256]
    assert meta["name"] == tiny_model_dir.name and meta["version"]

    dataset = discover_dataset(tiny_dataset)
    assert meta["dataset"]["fingerprint"] == dataset.fingerprint()
    assert meta["dataset"]["layout"] == "mvtec"
    assert meta["dataset"]["train_images"] == 4
    assert meta["validation"]["normal_images"] == 1
    assert meta["training"]["steps"] == 2

    teacher = meta["teacher"]
    assert teacher["source"] == "shipped"
    assert teacher["sha256"] == sha256_file(SHIPPED["s"])
    assert teacher["backbone"] == "mobilenet_v2"

    # quantiles: json and weights agree, q_a < q_b
    q = meta["quantiles"]
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    for key in ("qa_st", "qb_st", "qa_ae", "qb_ae"):
        assert weights[f"quantiles.{key}"].item() == pytest.approx(q[key], rel=1e-6)
    assert q["qa_st"] < q["qb_st"] and q["qa_ae"] < q["qb_ae"]
    assert (weights["mean_std.std"] > 0).all()
    # the teacher inside the model is the shipped one, unchanged by training
    shipped = load_file(str(SHIPPED["s"]))
    for key, value in shipped.items():
        assert torch.equal(weights[f"teacher.{key}"], value.float()), key

    # without labelled data: threshold = margin x p99.5 of the normal validation scores
    assert meta["threshold_method"].startswith("normal_quantile")
    normal = np.array(meta["validation"]["normal_scores"])
    expected = np.quantile(normal, 0.995)
    expected = expected * 1.2 if expected > 0 else expected + 0.12
    assert meta["threshold"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert meta["score_min"] <= meta["threshold"] <= meta["score_max"]


def test_engine_reproduces_the_calibration_scores(tiny_model_dir, tiny_dataset):
    torch.set_num_threads(2)
    engine = InferenceEngine.load(tiny_model_dir, device="cpu")
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    assert engine.info.threshold == meta["threshold"]
    assert engine.info.sha256 == meta["weights_sha256"]
    assert engine.info.image_size == (256, 256)

    dataset = discover_dataset(tiny_dataset)
    _, val = split_train_validation(dataset.train, 0.1, 42)
    defect = next(s for s in dataset.test if s.label == 1)
    pred = engine.predict_images([load_rgb(val[0].path), load_rgb(defect.path)])
    # the validation image scores what training recorded for it
    assert pred.scores[0] == pytest.approx(meta["validation"]["normal_scores"][0], rel=1e-4)
    assert pred.maps.shape == (2, 256, 256) and pred.maps.dtype == np.float32
    assert np.allclose(pred.scores, pred.maps.reshape(2, -1).max(axis=1), rtol=1e-6)
    assert np.array_equal(pred.anomalous, pred.scores >= engine.info.threshold)
    assert ((pred.normalized >= 0) & (pred.normalized <= 1)).all()

    # uint8 tensors of another size are resized inside
    batch = torch.from_numpy(np.stack([load_rgb(val[0].path)] * 2)).permute(0, 3, 1, 2)
    small = torch.nn.functional.interpolate(batch.float(), size=(200, 300)).round().byte()
    resized = engine.predict(small)
    assert resized.maps.shape == (2, 256, 256)
    assert resized.scores[0] == pytest.approx(resized.scores[1])


def test_cli_eval_and_predict_on_the_trained_model(tiny_model_dir, tiny_dataset, tmp_path):
    torch.set_num_threads(2)
    report_path = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_dataset),
            "--json",
            str(report_path),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert (report["overall"]["n_good"], report["overall"]["n_defective"]) == (2, 4)
    assert 0.0 <= report["overall"]["image_auroc"] <= 1.0
    assert report["dataset"]["fingerprint"] == discover_dataset(tiny_dataset).fingerprint()

    images = [
        tiny_dataset / "test" / "good" / "000.png",
        tiny_dataset / "test" / "spot" / "000.png",
    ]
    pred_path = tmp_path / "pred.json"
    code = main(
        [
            "predict",
            "--model",
            str(tiny_model_dir),
            *map(str, images),
            "--json",
            str(pred_path),
            "--maps-dir",
            str(tmp_path / "maps"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    payload = json.loads(pred_path.read_text())
    by_name = {Path(r["path"]).parent.name: r for r in payload["images"]}
    from_eval = {
        Path(r["path"]).parent.name: r["score"]
        for r in report["images"]
        if r["path"].endswith("000.png")
    }
    for name in ("good", "spot"):
        assert by_name[name]["score"] == pytest.approx(from_eval[name], rel=1e-4)
    maps = sorted((tmp_path / "maps").glob("*.npy"))
    assert len(maps) == 2 and np.load(maps[0]).shape == (256, 256)

    assert main(["predict", "--model", str(tmp_path / "no_model"), str(images[0])]) == 2


# --------------------------------------------------------------------------------------------
# bad input


def test_cli_train_refuses_bad_data_with_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    broken = tmp_path / "broken"
    (broken / "train" / "good").mkdir(parents=True)
    (broken / "train" / "good" / "000.png").write_bytes(b"\x89PNG truncated")
    (broken / "train" / "good" / "001.png").write_bytes(b"")
    cases = [
        (tmp_path / "absent", "does not exist"),
        (empty, "contains no images"),
        (broken, "cannot decode"),
    ]
    for data, message in cases:
        code = main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "m"),
                "--steps",
                "1",
                "--teacher",
                "shipped",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2, data
        assert message in err, (data, err)
    assert not (tmp_path / "m" / "model.json").exists()


def test_cli_train_refuses_images_below_256(tiny_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:  # the model card's rule, checked while parsing
        main(
            [
                "train",
                "--data",
                str(tiny_dataset),
                "--out",
                str(tmp_path / "m"),
                "--image-size",
                "128",
                "--teacher",
                "shipped",
                "--no-progress",
            ]
        )
    assert refused.value.code == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------
# thresholds


def test_pick_threshold_rules():
    normal = np.array([0.1, 0.2, 0.3, 0.4])
    thr, method = pick_threshold(normal, None, margin=1.5)
    assert thr == pytest.approx(np.quantile(normal, 0.995) * 1.5)
    assert method.startswith("normal_quantile")
    scores = np.array([0.1, 0.2, 0.35, 0.5, 0.9])
    labels = np.array([0, 0, 1, 0, 1])
    thr, method = pick_threshold(normal, (scores, labels), margin=1.5)
    assert thr == pytest.approx(best_f1(scores, labels)[1])
    assert thr == pytest.approx(0.35)  # F1 0.8 at >= 0.35 beats 0.667 at >= 0.9
    assert method.startswith("f1_optimal")
    # labelled data with one class only falls back to the normal scores
    thr, method = pick_threshold(normal, (scores, np.zeros(5, int)), margin=1.5)
    assert method.startswith("normal_quantile")
    with pytest.raises(DataError):
        pick_threshold(np.zeros(0), None, margin=1.5)


# --------------------------------------------------------------------------------------------
# resume


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def resumed(tiny_dataset, tmp_path_factory) -> dict:
    """Train 2 steps, interrupted right after the step-1 checkpoint; resume through the CLI.

    The resumed run also gets labelled threshold data. Records what the resume restored, the
    scores calibration saw and the optimizer the run used.
    """
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("resume") / "model"
    rec: dict = {"out": out, "scored": []}
    real_save = train_module.save_training_state
    real_load = train_module.load_training_state
    real_scores = train_module.image_scores

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # like Ctrl-C right after the checkpoint

    def record_load(directory, modules, optimizer, generators):
        result = real_load(directory, modules, optimizer, generators)
        rec["optimizer"] = optimizer
        rec["lr_after_load"] = optimizer.param_groups[0]["lr"]
        rec["adam_steps"] = {float(v["step"]) for v in optimizer.state_dict()["state"].values()}
        rec["student"] = modules["student"].conv4.weight.detach().clone()
        return result

    def record_scores(model, images, device, batch=8):
        scores = real_scores(model, images, device, batch)
        rec["scored"].append(scores)
        return scores

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "save_training_state", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(tiny_dataset, out, steps=2, checkpoint_every=1))
    rec["state_step"] = json.loads((out / "train_state" / "state.json").read_text())["step"]
    rec["model_json_after_interrupt"] = (out / "model.json").exists()
    rec["saved_state"] = load_file(str(out / "train_state" / "state.safetensors"))

    handler = _Records()
    logger = logging.getLogger("models.train")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module, "load_training_state", record_load)
            mp.setattr(train_module, "image_scores", record_scores)
            rec["code"] = main(
                [
                    "train",
                    "--data",
                    str(tiny_dataset),
                    "--out",
                    str(out),
                    "--steps",
                    "2",
                    "--teacher",
                    "shipped",
                    "--resume",
                    "--threshold-data",
                    str(tiny_dataset),
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    rec["log"] = handler.messages
    return rec


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(resumed):
    assert resumed["state_step"] == 1
    assert not resumed["model_json_after_interrupt"]
    assert resumed["code"] == 0
    assert "resumed training at step 1" in resumed["log"]
    assert resumed["adam_steps"] == {1.0}  # Adam moments came back with the weights
    saved = resumed["saved_state"]["module.student.conv4.weight"]
    assert torch.equal(resumed["student"], saved)
    meta = json.loads((resumed["out"] / "model.json").read_text())
    assert meta["training"]["steps"] == 2


@pytest.mark.slow
def test_threshold_is_f1_optimal_with_threshold_data(resumed, tiny_dataset):
    meta = json.loads((resumed["out"] / "model.json").read_text())
    assert meta["threshold_method"].startswith("f1_optimal")
    labels = np.array([s.label for s in discover_dataset(tiny_dataset).test])
    normal, labelled = resumed["scored"]  # normal validation first, then the labelled test split
    assert len(normal) == 1 and len(labelled) == len(labels) == 6
    assert meta["threshold"] == pytest.approx(best_f1(labelled, labels)[1])
    assert meta["score_min"] == pytest.approx(min(normal.min(), labelled.min()))


@pytest.mark.slow
def test_resume_keeps_the_learning_rate_schedule(resumed):
    # 2 steps: StepLR step_size = int(0.95 * 2) = 1, so a straight run uses lr 1e-4 at step 1
    # and 1e-5 at step 2, and ends at 1e-6
    assert resumed["lr_after_load"] == pytest.approx(1e-5)  # as saved after step 1
    assert resumed["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-6)


@pytest.mark.slow
def test_finished_training_can_be_extended_with_resume(
    tiny_model_dir, tmp_path, tiny_dataset, caplog
):
    assert has_training_state(tiny_model_dir / "train_state"), "no state saved at the end"
    out = tmp_path / "extended"
    shutil.copytree(tiny_model_dir, out)
    with caplog.at_level(logging.INFO, logger="models.train"):
        train(tiny_config(tiny_dataset, out, steps=3, resume=True))
    assert "resumed training at step 2" in caplog.text
    assert json.loads((out / "model.json").read_text())["training"]["steps"] == 3


# --------------------------------------------------------------------------------------------
# real data


@pytest.mark.slow
@pytest.mark.shared_data
def test_hazelnut_toy(tmp_path):
    root = SHARED_DATA / "hazelnut_toy"
    if not root.is_dir():
        pytest.skip(f"{root} not present (shared data is not part of the project)")
    torch.set_num_threads(2)
    out = train(tiny_config(root, tmp_path / "hazelnut", steps=1))
    meta = json.loads((out / "model.json").read_text())
    assert meta["dataset"]["train_images"] == 25 and meta["validation"]["normal_images"] == 3
    assert meta["dataset"]["fingerprint"] == discover_dataset(root).fingerprint()

    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--data",
                str(root),
                "--json",
                str(report),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    overall = json.loads(report.read_text())["overall"]
    assert (overall["n_good"], overall["n_defective"]) == (6, 17)
    assert overall["pixel_auroc"] is not None

    pred = tmp_path / "pred.json"
    images = [root / "test" / "good" / "04.jpg", root / "test" / "colour" / "03.jpg"]
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                *map(str, images),
                "--json",
                str(pred),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    results = json.loads(pred.read_text())["images"]
    assert [r["label"] in ("good", "anomalous") for r in results] == [True, True]
