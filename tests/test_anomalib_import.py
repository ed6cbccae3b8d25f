"""``import-anomalib``: parity with anomalib's own code, strictness, safe loading, thresholds.

The parity tests run anomalib's real ``torch_model.py`` from the pinned PyPI wheel (see
``tests/anomalib_ref/reference.py`` for what is stubbed and why); they skip when the wheel cannot
be downloaded, unless ``EFFICIENTAD_REQUIRE_ANOMALIB=1`` (CI) turns that into a failure. The other
tests build their input files from our ``EfficientAD``, whose state-dict keys are anomalib's
(asserted against the real model in ``test_state_dict_keys_match_anomalib``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from efficientad.cli import build_parser
from models.anomalib_import import AnomalibImportError, import_anomalib
from models.checkpoint import load_checkpoint
from models.inference import InferenceEngine, normalize_scores
from models.networks import EfficientAD
from pipeline.tools.scene import render_part

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ref():
    from tests.anomalib_ref.reference import ReferenceUnavailable, load_reference

    try:
        return load_reference()
    except ReferenceUnavailable as exc:
        if os.environ.get("EFFICIENTAD_REQUIRE_ANOMALIB") == "1":
            pytest.fail(f"anomalib reference required but unavailable: {exc}")
        pytest.skip(f"anomalib wheel unavailable (offline?): {exc}")


def _images(size: tuple[int, int], defects: tuple[str | None, ...]) -> torch.Tensor:
    """uint8 [B,3,H,W] RGB inspection images (normal and defective parts)."""
    out = []
    for i, defect in enumerate(defects):
        bgr, _ = render_part(np.random.default_rng(100 + i), size=size, defect=defect)
        out.append(torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1))
    return torch.stack(out)


def _fit_statistics(model: torch.nn.Module, calib: torch.Tensor, seed: int) -> None:
    """Non-zero mean_std, and quantiles of the model's own raw maps (anomalib's 0.9 / 0.995)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.mean_std["mean"].copy_(0.1 * torch.randn(1, 384, 1, 1, generator=gen))
        model.mean_std["std"].copy_(0.5 + torch.rand(1, 384, 1, 1, generator=gen))
        st, ae = model.get_maps(calib, normalize=False)
        for key, maps in (("st", st), ("ae", ae)):
            model.quantiles[f"qa_{key}"].copy_(torch.quantile(maps.flatten(), 0.9))
            model.quantiles[f"qb_{key}"].copy_(torch.quantile(maps.flatten(), 0.995))


def _ref_model(ref, size: str, padding: bool, pad_maps: bool, calib: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    model = ref.model(size, padding=padding, pad_maps=pad_maps).eval()
    _fit_statistics(model, calib, seed)
    return model


def _lightning_ckpt(ref, model, hparams: dict, **extra) -> dict:
    """What anomalib 2.7's Lightning checkpoint holds for EfficientAd (no optimizer state)."""
    state = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(
        {
            "post_processor._image_threshold": torch.tensor(0.31),
            "post_processor._pixel_threshold": torch.tensor(0.45),
            "post_processor.image_min": torch.tensor(0.05),
            "post_processor.image_max": torch.tensor(0.95),
            "post_processor.pixel_min": torch.tensor(-0.02),
            "post_processor.pixel_max": torch.tensor(1.3),
        }
    )
    optimizer = torch.optim.Adam(model.student.parameters(), lr=1e-4, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=66500, gamma=0.1)
    return {
        "epoch": 1,
        "global_step": 70000,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "hyper_parameters": hparams,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "anomalib_components_enabled": {
            "pre_processor": True,
            "post_processor": True,
            "evaluator": True,
            "visualizer": True,
        },
        **extra,
    }


def _anomalib_hparams(ref, size: str, padding: bool, pad_maps: bool) -> dict:
    tm = ref.torch_model
    return {
        "imagenet_dir": pathlib.PosixPath("datasets/imagenette"),  # as saved by anomalib < 2.7
        "teacher_out_channels": 384,
        "model_size": tm.EfficientAdModelSize.S if size == "s" else tm.EfficientAdModelSize.M,
        "lr": 1e-4,
        "weight_decay": 1e-5,
        "padding": padding,
        "pad_maps": pad_maps,
    }


def _compare(ref_model, engine: InferenceEngine, images: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        expected = ref_model(images.float() / 255.0)
    assert float(expected.anomaly_map.std()) > 1e-3  # a real map, so the tolerance means something
    got = engine.predict(images)
    assert got.maps.shape == tuple(expected.anomaly_map[:, 0].shape)
    map_diff = float(np.abs(got.maps - expected.anomaly_map[:, 0].numpy()).max())
    score_diff = float(np.abs(got.scores - expected.pred_score.flatten().numpy()).max())
    return map_diff, score_diff


def test_state_dict_keys_match_anomalib(ref) -> None:
    for size in ("s", "m"):
        theirs = {k: tuple(v.shape) for k, v in ref.model(size).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in EfficientAD(size).state_dict().items()}
        assert theirs == ours


@pytest.mark.parametrize(
    ("size", "padding", "pad_maps", "batch"),
    [("s", False, True, 2), ("m", False, True, 1), ("s", True, False, 1)],
    ids=["S", "M", "S-padding"],
)
def test_parity_with_anomalib(ref, tmp_path: Path, size, padding, pad_maps, batch) -> None:
    """Same weights, same inputs: anomaly map and score equal anomalib's within 1e-4 (fp32)."""
    from tests.anomalib_ref.reference import registered

    images = _images((256, 256), (None, "scratch")[:batch])
    model = _ref_model(ref, size, padding, pad_maps, images.float() / 255.0, seed=7)
    ckpt_file, plain_file = tmp_path / "model.ckpt", tmp_path / "weights.pt"
    with registered(ref):  # anomalib's enum pickles under its real module name
        torch.save(
            _lightning_ckpt(ref, model, _anomalib_hparams(ref, size, padding, pad_maps)), ckpt_file
        )
    torch.save(model.state_dict(), plain_file)

    out = import_anomalib(ckpt_file, tmp_path / "from_ckpt")  # everything auto-detected
    meta = json.loads((out / "model.json").read_text())
    assert (meta["model_size"], meta["padding"], meta["pad_maps"]) == (size, padding, pad_maps)
    assert meta["provenance"]["description"] == "imported from anomalib"
    assert meta["provenance"]["format"] == "lightning-checkpoint"
    assert meta["threshold"] == pytest.approx(0.31)

    plain = import_anomalib(
        plain_file, tmp_path / "from_plain", threshold=0.31, padding=padding, pad_maps=pad_maps
    )
    plain_meta = json.loads((plain / "model.json").read_text())
    assert plain_meta["weights_sha256"] == meta["weights_sha256"]  # identical weights

    engine = InferenceEngine.load(out, device="cpu")
    map_diff, score_diff = _compare(model, engine, images)
    print(f"\nparity {size} padding={padding} 256x256: map {map_diff:.3g} score {score_diff:.3g}")
    assert map_diff <= TOLERANCE
    assert score_diff <= TOLERANCE


def test_parity_non_square(ref, tmp_path: Path) -> None:
    """A 256x320 model (size read from the checkpoint's saved Resize) matches anomalib too."""
    size = (256, 320)
    images = _images(size, ("crack",))
    model = _ref_model(ref, "s", False, True, images.float() / 255.0, seed=11)
    pre = {
        "transform": {
            "class_path": "torchvision.transforms.v2.Compose",
            "init_args": {
                "transforms": [
                    {
                        "class_path": "torchvision.transforms.v2.Resize",
                        "init_args": {
                            "size": list(size),
                            "interpolation": "bilinear",
                            "max_size": None,
                            "antialias": True,
                        },
                    }
                ]
            },
        }
    }
    file = tmp_path / "model.ckpt"
    torch.save(
        _lightning_ckpt(
            ref, model, {"padding": False, "pad_maps": True}, anomalib_pre_processor_config=pre
        ),
        file,
    )
    out = import_anomalib(file, tmp_path / "model")
    engine = InferenceEngine.load(out, device="cpu")
    assert engine.info.image_size == size
    map_diff, score_diff = _compare(model, engine, images)
    print(f"\nparity S 256x320: map {map_diff:.3g} score {score_diff:.3g}")
    assert map_diff <= TOLERANCE
    assert score_diff <= TOLERANCE


@pytest.mark.parametrize("sensitivity", [0.5, 0.3, 0.8])
def test_decisions_and_normalised_scores_match_anomalib(ref, tmp_path, sensitivity) -> None:
    """anomalib's post-processor (its own _normalize/_apply_threshold) vs our stored threshold."""
    file = tmp_path / "state.pt"
    state = {"model." + k: v for k, v in _calibrated_state("s").items()}
    thr, lo, hi = 0.31, 0.05, 0.95
    state.update(
        {
            "post_processor._image_threshold": torch.tensor(thr),
            "post_processor.image_min": torch.tensor(lo),
            "post_processor.image_max": torch.tensor(hi),
        }
    )
    torch.save(
        {"state_dict": state, "anomalib_post_processor_config": {"image_sensitivity": sensitivity}},
        file,
    )
    info = InferenceEngine.load(import_anomalib(file, tmp_path / "m"), device="cpu").info

    scores = torch.linspace(-0.2, 1.4, 1601, dtype=torch.float64).float()
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    normalized = ref.normalize(scores, t(lo), t(hi), t(thr))
    labels = ref.apply_threshold(normalized, torch.tensor(1.0) - sensitivity).numpy()
    ours = scores.numpy() >= info.threshold
    away = np.abs(scores.numpy() - info.threshold) > 1e-5  # exact ties are > vs >=
    assert np.array_equal(labels[away], ours[away])
    if sensitivity == 0.5:
        assert np.abs(normalize_scores(scores.numpy(), info) - normalized.numpy()).max() < 1e-6


# ----------------------------------------------------------------------------------------------
# Offline tests: input files built from our EfficientAD (anomalib's key names)


def _calibrated_state(size: str = "s") -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = EfficientAD(size)
    with torch.no_grad():
        model.mean_std.mean.normal_(0, 0.1)
        model.mean_std.std.uniform_(0.5, 1.5)
        q = model.quantiles
        q.qa_st.fill_(1.0), q.qb_st.fill_(2.0), q.qa_ae.fill_(0.5), q.qb_ae.fill_(1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def state_s() -> dict[str, torch.Tensor]:
    return _calibrated_state("s")


def test_plain_state_dict_needs_threshold(tmp_path: Path, state_s) -> None:
    file = tmp_path / "weights.pth"
    torch.save(state_s, file)
    with pytest.raises(AnomalibImportError, match=r"no image threshold.*--threshold"):
        import_anomalib(file, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing written
    out = import_anomalib(file, tmp_path / "m", threshold=0.4, name="line-3")
    model, card = load_checkpoint(out)
    meta = card.as_json()
    assert meta["name"] == "line-3"
    assert meta["threshold"] == 0.4 and meta["threshold_method"] == "fixed (--threshold)"
    assert (meta["score_min"], meta["score_max"]) == (0.0, 0.8)
    assert meta["provenance"]["format"] == "model-state-dict"
    assert meta["provenance"]["sha256"] == meta["teacher"]["sha256"]
    assert meta["provenance"]["settings_from"]["padding"].startswith("default")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_s[key]), key


def test_threshold_carry_over(tmp_path: Path, state_s) -> None:
    base = {"model." + k: v for k, v in state_s.items()}
    cases = {
        "image": (
            {
                "post_processor._image_threshold": torch.tensor(0.3),
                "post_processor._pixel_threshold": torch.tensor(0.7),
                "post_processor.image_min": torch.tensor(0.1),
                "post_processor.image_max": torch.tensor(0.9),
            },
            0.3,
            (0.1, 0.9),
        ),
        "pixel-fallback": (
            {
                "post_processor._image_threshold": torch.tensor(math.nan),
                "post_processor._pixel_threshold": torch.tensor(0.7),
            },
            0.7,
            (0.0, 1.4),
        ),
        "anomalib-1.x": (
            {
                "image_threshold.value": torch.tensor(0.25),
                "normalization_metrics.pred_scores.min": torch.tensor(0.0),
                "normalization_metrics.pred_scores.max": torch.tensor(0.6),
                "image_threshold_class": "anomalib.metrics.F1AdaptiveThreshold",
            },
            0.25,
            (0.0, 0.6),
        ),
    }
    for case, (extra, threshold, score_range) in cases.items():
        file = tmp_path / f"{case}.pt"
        torch.save({**base, **extra}, file)
        out = import_anomalib(file, tmp_path / case)
        meta = json.loads((out / "model.json").read_text())
        assert meta["threshold"] == pytest.approx(threshold), case
        assert (meta["score_min"], meta["score_max"]) == pytest.approx(score_range), case
        assert meta["provenance"]["format"] == "lightning-state-dict"
    # an explicit threshold wins over the file's and keeps anomalib's score range
    out = import_anomalib(tmp_path / "image.pt", tmp_path / "override", threshold=0.5)
    meta = json.loads((out / "model.json").read_text())
    assert meta["threshold"] == 0.5 and meta["provenance"]["anomalib_threshold"]["image_threshold"]
    assert (meta["score_min"], meta["score_max"]) == pytest.approx((0.1, 0.9))
    # NaN everywhere = anomalib never validated: no threshold
    file = tmp_path / "nan.pt"
    torch.save({**base, "post_processor._image_threshold": torch.tensor(math.nan)}, file)
    with pytest.raises(AnomalibImportError, match=r"no image threshold"):
        import_anomalib(file, tmp_path / "nan")


def test_strict_keys_and_shapes(tmp_path: Path, state_s) -> None:
    missing = {k: v for k, v in state_s.items() if k != "ae.decoder.deconv8.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(AnomalibImportError, match=r"missing keys \['ae.decoder.deconv8.bias'\]"):
        import_anomalib(tmp_path / "missing.pt", tmp_path / "a", threshold=0.3)

    torch.save({**state_s, "extra.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(AnomalibImportError, match=r"unexpected keys \['extra.weight'\]"):
        import_anomalib(tmp_path / "extra.pt", tmp_path / "b", threshold=0.3)

    ckpt = {
        "state_dict": {
            **{"model." + k: v for k, v in state_s.items()},
            "model.student.conv9.weight": torch.zeros(1),
            "post_processor.image_min": torch.tensor(0.0),
        }
    }
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.raises(AnomalibImportError, match=r"student.conv9.weight"):
        import_anomalib(tmp_path / "extra.ckpt", tmp_path / "c", threshold=0.3)

    bad = dict(state_s)
    bad["student.conv4.weight"] = torch.zeros(384, 256, 4, 4)  # teacher-sized student head
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(AnomalibImportError, match=r"shape mismatches.*student.conv4.weight"):
        import_anomalib(tmp_path / "shape.pt", tmp_path / "d", threshold=0.3)

    torch.save(state_s, tmp_path / "s.pt")
    with pytest.raises(AnomalibImportError, match=r"--model-size m requested.*EfficientAD-S"):
        import_anomalib(tmp_path / "s.pt", tmp_path / "e", threshold=0.3, model_size="m")
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in state_s.items()},
            "hyper_parameters": {"model_size": "medium"},
        },
        tmp_path / "hp.ckpt",
    )
    with pytest.raises(AnomalibImportError, match=r"model_size='m'.*EfficientAD-S"):
        import_anomalib(tmp_path / "hp.ckpt", tmp_path / "f", threshold=0.3)

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "teacher.pth")
    with pytest.raises(AnomalibImportError, match=r"not an EfficientAD state dict"):
        import_anomalib(tmp_path / "teacher.pth", tmp_path / "g", threshold=0.3)
    assert not any((tmp_path / d).exists() for d in "abcdefg")


def test_unfitted_statistics_are_refused(tmp_path: Path, state_s) -> None:
    no_quantiles = {
        **state_s,
        **{f"quantiles.{k}": torch.tensor(0.0) for k in ("qa_st", "qb_st", "qa_ae", "qb_ae")},
    }
    torch.save(no_quantiles, tmp_path / "q.pt")
    with pytest.raises(AnomalibImportError, match=r"quantiles are not set"):
        import_anomalib(tmp_path / "q.pt", tmp_path / "a", threshold=0.3)
    no_stats = {
        **state_s,
        "mean_std.mean": torch.zeros(1, 384, 1, 1),
        "mean_std.std": torch.zeros(1, 384, 1, 1),
    }
    torch.save(no_stats, tmp_path / "ms.pt")
    with pytest.raises(AnomalibImportError, match=r"mean_std is not set"):
        import_anomalib(tmp_path / "ms.pt", tmp_path / "b", threshold=0.3)
    nan = {**state_s, "student.conv1.bias": torch.full((128,), math.nan)}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(AnomalibImportError, match=r"student.conv1.bias contains NaN"):
        import_anomalib(tmp_path / "nan.pt", tmp_path / "c", threshold=0.3)


def _touch(path: str) -> None:
    Path(path).write_text("pickled code ran")


class _Payload:
    """Unpickling this object would call ``_touch`` (stands for any code in a malicious file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_pickled_objects_are_refused_not_executed(tmp_path: Path, state_s) -> None:
    marker = tmp_path / "marker"
    ckpt = {
        "state_dict": {"model." + k: v for k, v in state_s.items()},
        "callbacks": {"evil": _Payload(marker)},
    }
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(AnomalibImportError, match=r"refused.*_touch.*weights_only=True"):
        import_anomalib(tmp_path / "evil.ckpt", tmp_path / "out", threshold=0.3)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(AnomalibImportError, match=r"not a readable PyTorch checkpoint"):
        import_anomalib(tmp_path / "junk.ckpt", tmp_path / "out", threshold=0.3)
    with pytest.raises(AnomalibImportError, match=r"file not found"):
        import_anomalib(tmp_path / "absent.ckpt", tmp_path / "out", threshold=0.3)


def _run_cli(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path: Path, state_s, capsys) -> None:
    file = tmp_path / "weights.pt"
    torch.save(state_s, file)
    out = tmp_path / "model"
    assert _run_cli(["import-anomalib", str(file), "--out", str(out)]) == 2  # no threshold
    argv = [
        "import-anomalib",
        str(file),
        "--out",
        str(out),
        "--threshold",
        "0.35",
        "--model-size",
        "s",
        "--no-padding",
        "--image-size",
        "256x288",
        "--name",
        "cam1",
    ]
    assert _run_cli(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["threshold"] == 0.35 and printed["image_size"] == [256, 288]
    assert _run_cli(argv) == 2  # refuses to overwrite
    assert _run_cli([*argv, "--force", "--threshold", "0.4"]) == 0
    engine = InferenceEngine.load(out, device="cpu")
    assert engine.info.threshold == 0.4 and engine.info.name == "cam1"
    assert engine.info.image_size == (256, 288)
    small = ["import-anomalib", str(file), "--out", str(tmp_path / "x"), "--threshold", "0.3"]
    with pytest.raises(SystemExit) as refused:  # below 256: refused while parsing, exit 2
        _run_cli([*small, "--image-size", "128"])
    assert refused.value.code == 2
    assert "too small" in capsys.readouterr().err
