"""Model checkpoints (safetensors + JSON) and resumable training state round trips."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efficientad.cli import build_parser
from models.checkpoint import (
    FORMAT,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    read_safetensors_metadata,
    save_checkpoint,
    save_teacher,
    sha256_file,
)
from models.inference import InferenceEngine
from models.networks import EfficientAD, PDNSmall
from models.training_state import has_training_state, load_training_state, save_training_state
from models.version import __version__

META = {
    "name": "unit",
    "version": "v1",
    "image_size": [256, 320],
    "threshold": 0.25,
    "score_min": 0.0,
    "score_max": 1.0,
}


def calibrated_model(**kwargs) -> EfficientAD:
    torch.manual_seed(3)
    model = EfficientAD("s", **kwargs)
    model.mean_std.mean.normal_()
    model.mean_std.std.uniform_(0.5, 2.0)
    for i, name in enumerate(("qa_st", "qb_st", "qa_ae", "qb_ae")):
        getattr(model.quantiles, name).fill_(0.1 * (i + 1))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[EfficientAD, Path]:
    model = calibrated_model()
    out = save_checkpoint(model, META, tmp_path_factory.mktemp("ckpt") / "model")
    return model, out


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in (WEIGHTS_FILE, META_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def rewrite_meta(model_dir: Path, **changes) -> None:
    meta = json.loads((model_dir / META_FILE).read_text())
    meta.update(changes)
    (model_dir / META_FILE).write_text(json.dumps(meta))


def test_round_trip_gives_identical_tensors_and_metadata(saved):
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == [META_FILE, WEIGHTS_FILE]
    loaded, card = load_checkpoint(out)
    meta = json.loads((out / META_FILE).read_text())
    assert card.as_json() == meta  # the card is model.json, typed
    original = model.state_dict()
    restored = loaded.state_dict()
    assert set(restored) == set(original)
    for key, value in original.items():
        assert torch.equal(restored[key], value), key
    assert not loaded.training
    assert meta["format"] == FORMAT
    assert meta["package_version"] == __version__
    assert (meta["model_size"], meta["padding"], meta["pad_maps"]) == ("s", False, True)
    assert meta["weights_sha256"] == sha256_file(out / WEIGHTS_FILE)
    for key, value in META.items():
        assert meta[key] == value
    # the weights file itself is a valid argument too
    again, _ = load_checkpoint(out / WEIGHTS_FILE)
    assert torch.equal(again.student.conv4.weight, model.student.conv4.weight)


def test_padding_flags_travel_with_the_checkpoint(tmp_path):
    model = calibrated_model(padding=True, pad_maps=False)
    loaded, _ = load_checkpoint(save_checkpoint(model, META, tmp_path / "padded"))
    assert (loaded.padding, loaded.pad_maps) == (True, False)
    assert loaded.teacher.conv1.padding == (3, 3)


def test_tampered_weights_are_detected(saved, tmp_path):
    _, out = saved
    bad = copy_dir(out, tmp_path / "bad")
    data = bytearray((bad / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's data; the file still parses
    (bad / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(bad)
    model, _ = load_checkpoint(bad, verify_hash=False)  # explicit opt-out still loads
    assert model is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "anomalib"}, "format"),
        ({"model_size": "xl"}, "model_size"),
    ],
)
def test_wrong_metadata_gives_clear_errors(saved, tmp_path, change, message):
    bad = copy_dir(saved[1], tmp_path / "bad")
    rewrite_meta(bad, **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)


def test_missing_or_broken_files_give_clear_errors(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    no_meta = copy_dir(saved[1], tmp_path / "no_meta")
    (no_meta / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no model\.json"):
        load_checkpoint(no_meta)
    bad_json = copy_dir(saved[1], tmp_path / "bad_json")
    (bad_json / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(bad_json)


def resave_weights(model_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Replace the weights and record their new hash, so only the key/shape checks can object."""
    save_file(state, str(model_dir / WEIGHTS_FILE))
    rewrite_meta(model_dir, weights_sha256=sha256_file(model_dir / WEIGHTS_FILE))


def test_missing_unexpected_and_misshaped_keys_are_listed(saved, tmp_path):
    state = load_file(str(saved[1] / WEIGHTS_FILE))

    missing = copy_dir(saved[1], tmp_path / "missing")
    resave_weights(missing, {k: v for k, v in state.items() if k != "ae.decoder.deconv8.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys \['ae.decoder.deconv8.bias'\]"):
        load_checkpoint(missing)

    extra = copy_dir(saved[1], tmp_path / "extra")
    resave_weights(extra, {**state, "student.conv9.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['student.conv9.weight'\]"):
        load_checkpoint(extra)

    shape = copy_dir(saved[1], tmp_path / "shape")
    resave_weights(shape, {**state, "teacher.conv4.bias": torch.zeros(768)})
    with pytest.raises(CheckpointError, match=r"teacher.conv4.bias: file \(768,\) vs net \(384,\)"):
        load_checkpoint(shape)


# ------------------------------------------------------------------ unusable models refused at load

FULL_META = {**META, "image_size": [256, 256]}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    """A complete model directory InferenceEngine.load accepts (copy before changing it)."""
    return save_checkpoint(calibrated_model(), FULL_META, tmp_path_factory.mktemp("eng") / "m")


def test_a_complete_model_loads(engine_dir):
    engine = InferenceEngine.load(engine_dir, device="cpu")
    assert engine.info.threshold == 0.25 and engine.info.image_size == (256, 256)


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"threshold": float("nan")}, "threshold = nan"),
        ({"threshold": float("inf")}, "threshold = inf"),
        ({"score_min": float("-inf")}, "score_min = -inf"),
        ({"score_max": float("nan")}, "score_max = nan"),
        ({"image_size": [100, 100]}, "image_size = 100x100"),
        ({"image_size": [256, 100_000]}, "image_size = 256x100000"),
    ],
)
def test_unusable_metadata_is_refused_at_load_naming_field_and_value(
    engine_dir, tmp_path, change, shown
):
    """Before: a NaN threshold loaded and never alarmed; a bad size failed only at inference."""
    bad = copy_dir(engine_dir, tmp_path / "bad")
    rewrite_meta(bad, **change)  # json writes NaN/Infinity, as a careless exporter would
    with pytest.raises(CheckpointError) as info:
        InferenceEngine.load(bad, device="cpu")
    assert shown in str(info.value) and str(bad) in str(info.value)
    if "image_size" in change:
        assert "[256, 4096]" in str(info.value)


@pytest.mark.parametrize("key", ["student.conv4.weight", "quantiles.qb_st", "mean_std.std"])
def test_non_finite_weights_are_refused_at_load(engine_dir, tmp_path, key):
    state = load_file(str(engine_dir / WEIGHTS_FILE))
    state[key].view(-1)[0] = float("nan") if key != "quantiles.qb_st" else float("inf")
    bad = copy_dir(engine_dir, tmp_path / "bad")
    resave_weights(bad, state)
    with pytest.raises(CheckpointError, match=rf"{key} contains NaN or infinite values \(1 of"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        InferenceEngine.load(bad, device="cpu")


def test_cli_exits_2_for_an_unusable_model(engine_dir, tmp_path, capsys):
    bad = copy_dir(engine_dir, tmp_path / "bad")
    rewrite_meta(bad, threshold=float("nan"))
    image = tmp_path / "part.png"
    assert cv2.imwrite(str(image), np.full((256, 256, 3), 90, np.uint8))
    parser = build_parser()
    args = parser.parse_args(["predict", "--model", str(bad), str(image), "--device", "cpu"])
    assert args.func(args) == 2
    assert "threshold = nan" in capsys.readouterr().err


class _Trap:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_in_place_of_safetensors_is_refused_without_unpickling(saved, tmp_path):
    marker = tmp_path / "unpickled"
    bad = copy_dir(saved[1], tmp_path / "pickled")
    (bad / WEIGHTS_FILE).write_bytes(pickle.dumps({"teacher.conv1.weight": _Trap(marker)}))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(bad)
    # even with a matching hash (or the check switched off) it must fail cleanly, never unpickle
    rewrite_meta(bad, weights_sha256=sha256_file(bad / WEIGHTS_FILE))
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad, verify_hash=False)
    assert not marker.exists()


def test_teacher_file_round_trip_with_header_metadata(tmp_path):
    torch.manual_seed(0)
    pdn = PDNSmall()
    path = save_teacher(pdn, {"backbone": "resnet18", "steps": 3}, tmp_path / "t.safetensors")
    state = load_file(str(path))
    assert set(state) == set(pdn.state_dict())
    assert all(torch.equal(state[k], v) for k, v in pdn.state_dict().items())
    meta = read_safetensors_metadata(path)
    assert meta["backbone"] == "resnet18" and meta["steps"] == 3
    assert meta["format"] == "efficientad-line/teacher"
    half = save_teacher(pdn, {}, tmp_path / "h.safetensors", dtype=torch.float16)
    assert load_file(str(half))["conv4.weight"].dtype == torch.float16


# --------------------------------------------------------------------------------------------
# training state


def make_run(seed: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    b = nn.Linear(5, 3)
    opt = torch.optim.Adam(list(a.parameters()) + list(b.parameters()), lr=1e-2, weight_decay=1e-5)
    return a, b, opt, torch.Generator().manual_seed(seed)


def run_steps(a, b, opt, gen, n: int) -> None:
    for _ in range(n):
        x = torch.randn(2, 3, 6, 6, generator=gen)
        y = torch.randn(2, 5, generator=gen)
        loss = a(x).pow(2).mean() + b(y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_state_round_trip_restores_weights_adam_step_and_rng(tmp_path):
    a, b, opt, gen = make_run(0)
    run_steps(a, b, opt, gen, 3)
    assert not has_training_state(tmp_path)
    save_training_state(tmp_path, {"a": a, "b": b}, opt, 3, {"note": "x"}, {"gen": gen})
    assert has_training_state(tmp_path)

    a2, b2, opt2, gen2 = make_run(1)  # different weights and RNG until restored
    step, extra = load_training_state(tmp_path, {"a": a2, "b": b2}, opt2, {"gen": gen2})
    assert (step, extra) == (3, {"note": "x"})
    for m1, m2 in ((a, a2), (b, b2)):
        for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
            assert torch.equal(v1, v2), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"] == 1e-2
    assert s2["param_groups"][0]["weight_decay"] == 1e-5
    assert tuple(s2["param_groups"][0]["betas"]) == tuple(s1["param_groups"][0]["betas"])
    assert set(s1["state"]) == set(s2["state"])
    for idx, slot in s1["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(slot[name], s2["state"][idx][name]), (idx, name)
    assert torch.equal(gen.get_state(), gen2.get_state())

    # continuing both runs gives bit-identical results
    run_steps(a, b, opt, gen, 2)
    run_steps(a2, b2, opt2, gen2, 2)
    for v1, v2 in zip(a.state_dict().values(), a2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2)


def test_training_state_holds_no_pickle(tmp_path):
    a, b, opt, gen = make_run(0)
    run_steps(a, b, opt, gen, 1)
    save_training_state(tmp_path, {"a": a, "b": b}, opt, 1, {}, {"gen": gen})
    tensors = load_file(str(tmp_path / "state.safetensors"))  # plain safetensors
    assert any(k.startswith("optim.") for k in tensors)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1
