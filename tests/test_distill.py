"""Teacher distillation: backbone taps, PatchCore-style targets, training, resume, and the result
used as a teacher.

The backbone is a ResNet-18 with random (seeded) weights saved to a file here, so nothing is
downloaded (a random MobileNetV2's stride-16 features are nearly constant, a random ResNet's are
not); the distillation runs use tiny crops (64 px to the backbone, 32 px to the PDN) to stay
cheap. The shape arithmetic is the same as at the real 512 / 256 px.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

from efficientad.cli import main
from models.backbones import BACKBONES, BackboneError, FeatureTaps, get_spec, load_backbone
from models.checkpoint import read_safetensors_metadata, sha256_file
from models.distill import (
    DistillConfig,
    DistillError,
    ImageBank,
    PatchTarget,
    distill,
    find_images,
    target_statistics,
)
from models.teacher import resolve_teacher

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EFFICIENTAD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SHARED_WEIGHTS = SHARED_DATA.parent / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight small textured images (blurred noise plus a filled disc), two of them large."""
    folder = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (700, 600) if i < 2 else (96, 128)
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
        centre = (int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, centre, int(rng.integers(5, min(h, w) // 3)), colour, -1)
        cv2.imwrite(str(folder / f"img_{i}.png"), img)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "resnet18_random.safetensors"
    save_file(torchvision.models.resnet18(weights=None).state_dict(), str(path))
    return path


# --------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_taps_have_stride_8_and_16_with_documented_channels(name):
    spec = get_spec(name)
    with torch.device("meta"):  # shapes only: no weights, no FLOPs
        taps = FeatureTaps(spec, getattr(torchvision.models, name)(weights=None)).eval()
    s8, s16 = taps(torch.empty(2, 3, 512, 512, device="meta"))
    assert tuple(s8.shape) == (2, spec.channels[0], 64, 64)
    assert tuple(s16.shape) == (2, spec.channels[1], 32, 32)


def test_backbone_taps_compute_real_features():
    torch.manual_seed(0)
    spec = get_spec("resnet18")
    taps = FeatureTaps(spec, torchvision.models.resnet18(weights=None)).eval()
    with torch.no_grad():
        s8, s16 = taps(torch.rand(1, 3, 128, 128))
    assert s8.shape == (1, 128, 16, 16) and s16.shape == (1, 256, 8, 8)
    assert torch.isfinite(s8).all() and s8.abs().sum() > 0


def test_load_backbone_from_file_records_its_hash(backbone_weights, tmp_path):
    taps, provenance = load_backbone("resnet18", backbone_weights)
    assert provenance.startswith(f"file:{backbone_weights.name} sha256:")
    assert not taps.training
    assert not any(p.requires_grad for p in taps.parameters())
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("resnet18", tmp_path / "absent.pth")
    with pytest.raises(BackboneError, match="unknown backbone 'vgg16'"):
        load_backbone("vgg16", backbone_weights)


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"{SHARED_WEIGHTS} not present")
def test_shared_imagenet_mobilenet_v2_weights_load():
    _, provenance = load_backbone("mobilenet_v2", SHARED_WEIGHTS)
    assert "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889" in provenance


# --------------------------------------------------------------------------------------------
# targets


@pytest.fixture(scope="module")
def target(backbone_weights) -> PatchTarget:
    taps, _ = load_backbone("resnet18", backbone_weights)
    return PatchTarget(taps).eval()


def test_patch_target_is_384_channels_on_the_stride_8_grid(target):
    torch.manual_seed(0)
    y = target(torch.rand(1, 3, 512, 512))
    assert y.shape == (1, 384, 64, 64)
    assert torch.isfinite(y).all()
    assert y.std() > 0


def test_target_statistics_normalise_their_sample(images, target):
    bank = ImageBank(find_images(images), max_side=512, device=torch.device("cpu"))
    assert len(bank) == 8
    assert bank.images.shape[-1] == 512  # large images were scaled to max_side
    cfg = DistillConfig(
        images=images, out=Path("unused"), batch=2, stat_samples=4, backbone_input=128
    )
    mean, std = target_statistics(target, bank, cfg, torch.Generator().manual_seed(5))
    assert mean.shape == std.shape == (1, 384, 1, 1)
    assert (std > 0).all()
    # the same 4 crops again (one batch of stat_samples with the same generator state)
    crops = bank.sample(
        4, 128, torch.Generator().manual_seed(5), cfg.min_crop_scale, cfg.grayscale_p
    )
    z = ((target(crops) - mean) / std).double()
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (z.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-3


def test_bank_crops_are_in_range_and_sized(images):
    bank = ImageBank(find_images(images), max_side=256, device=torch.device("cpu"))
    crops = bank.sample(3, 64, torch.Generator().manual_seed(0), 0.25, 1.0)
    assert crops.shape == (3, 3, 64, 64)
    assert crops.min() >= 0 and crops.max() <= 1
    assert torch.allclose(crops[:, 0], crops[:, 1]) and torch.allclose(crops[:, 1], crops[:, 2])


def test_missing_or_unreadable_images_are_clear_errors(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        find_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="no images"):
        find_images(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(DistillError, match="none of the images"):
        ImageBank(find_images(broken), 512, torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# distillation runs


@pytest.fixture(scope="module")
def runs(images, backbone_weights, tmp_path_factory) -> dict[str, DistillConfig]:
    """untrained (0 steps), 2 steps, resumed 2 -> 4, and straight 4 steps."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("distill")
    base = DistillConfig(
        images=images,
        out=out / "t0.safetensors",
        backbone="resnet18",
        backbone_weights=backbone_weights,
        steps=0,
        batch=2,
        lr=1e-3,
        stat_samples=4,
        backbone_input=64,
        pdn_input=32,
        device="cpu",
        checkpoint_every=2,
        seed=3,
    )
    cfgs = {
        "untrained": base,
        "half": replace(base, out=out / "t2.safetensors", steps=2),
        "straight": replace(base, out=out / "t4.safetensors", steps=4),
    }
    cfgs["resumed"] = replace(
        base, out=out / "t4r.safetensors", steps=4, resume=True, work_dir=out / "resume.work"
    )
    for key in ("untrained", "half", "straight"):
        distill(cfgs[key])
    # resume from a copy of the 2-step run's state (the resumed run writes its own checkpoints)
    shutil.copytree(out / "t2.safetensors.work", out / "resume.work")
    distill(cfgs["resumed"])
    return cfgs


def pdn_loss(teacher_file: Path, cfg: DistillConfig, target: PatchTarget) -> float:
    """MSE of the teacher against the normalised target on fixed crops (the distillation loss)."""
    stats = load_file(str(Path(str(cfg.out) + ".work") / "state.safetensors"))  # target mean/std
    mean, std = stats["module.stats.mean"], stats["module.stats.std"]
    bank = ImageBank(find_images(cfg.images), cfg.max_side, torch.device("cpu"))
    x = bank.sample(8, cfg.backbone_input, torch.Generator().manual_seed(99), 0.25, 0.0)
    y = (target(x) - mean) / std
    small = F.interpolate(x, size=(cfg.pdn_input,) * 2, mode="bilinear", antialias=True)
    pdn, _ = resolve_teacher(teacher_file, "s")
    # distillation runs the PDN with padding; same weights, padded convs
    padded = type(pdn)(padding=True)
    padded.load_state_dict(pdn.state_dict())
    with torch.no_grad():
        return float(F.mse_loss(padded(small), y))


@pytest.mark.slow
def test_distillation_reduces_the_loss(runs, target):
    before = pdn_loss(runs["untrained"].out, runs["straight"], target)
    after = pdn_loss(runs["straight"].out, runs["straight"], target)
    assert after < 0.95 * before, (before, after)  # 4 steps: about -10 % here


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(runs):
    half_state = json.loads((Path(str(runs["half"].out) + ".work") / "state.json").read_text())
    assert half_state["step"] == 2
    straight = load_file(str(runs["straight"].out))
    resumed = load_file(str(runs["resumed"].out))
    assert set(straight) == set(resumed)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-6, rtol=1e-5), key
    assert not torch.equal(
        straight["conv4.weight"], load_file(str(runs["half"].out))["conv4.weight"]
    )
    meta = read_safetensors_metadata(runs["resumed"].out)
    assert meta["steps"] == 4


@pytest.mark.slow
def test_distilled_teacher_file_has_provenance_and_loads_as_teacher(runs, backbone_weights):
    path = runs["straight"].out
    meta = read_safetensors_metadata(path)
    assert meta["kind"] == "teacher" and meta["model_size"] == "s"
    assert meta["backbone"] == "resnet18"
    assert backbone_weights.name in meta["backbone_weights"]
    assert meta["steps"] == 4 and meta["num_images"] == 8
    assert meta["trained_with_padding"] is True
    assert np.isfinite(meta["final_loss"])
    pdn, info = resolve_teacher(path, "s")
    assert info.source == "file" and info.location == str(path)
    assert info.details["meta"]["backbone"] == "resnet18"
    assert all(torch.equal(pdn.state_dict()[k], v) for k, v in load_file(str(path)).items())


@pytest.mark.slow
def test_distilled_teacher_trains_a_model_through_the_cli(runs, tiny_dataset, tmp_path, capsys):
    teacher = runs["straight"].out
    out = tmp_path / "with_distilled"
    code = main(
        [
            "train",
            "--data",
            str(tiny_dataset),
            "--out",
            str(out),
            "--steps",
            "1",
            "--teacher",
            str(teacher),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["teacher"] == "file"
    meta = json.loads((out / "model.json").read_text())
    assert meta["teacher"]["source"] == "file"
    assert meta["teacher"]["location"] == str(teacher)
    weights = load_file(str(out / "model.safetensors"))
    for key, value in load_file(str(teacher)).items():
        assert torch.equal(weights[f"teacher.{key}"], value), key


def distill_cli(images: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(
        [
            "distill",
            "--images",
            str(images),
            "--out",
            str(out),
            "--backbone",
            "resnet18",
            "--backbone-weights",
            str(weights),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_distill_cli_rejects_missing_images(tmp_path, backbone_weights, capsys):
    code = distill_cli(tmp_path / "none", tmp_path / "t.safetensors", backbone_weights)
    assert code == 2
    assert "image folder not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# warm start (--init)


@pytest.mark.slow
def test_warm_start_begins_at_the_parent_and_reuses_its_target(runs, tmp_path):
    parent = runs["half"].out
    parent_meta = read_safetensors_metadata(parent)
    zero = replace(runs["half"], out=tmp_path / "w0.safetensors", steps=0, init=parent)
    distill(zero)
    for key, value in load_file(str(parent)).items():
        assert torch.equal(load_file(str(zero.out))[key], value), key
    meta = read_safetensors_metadata(zero.out)
    assert meta["init"]["sha256"] == sha256_file(parent)
    assert meta["init"]["path"] == str(parent) and meta["init"]["same_target"] is True
    assert meta["total_steps"] == 2 and meta["steps"] == 0
    # the target normalisation is the parent's, not re-estimated from other random crops
    assert meta["target_mean"] == parent_meta["target_mean"]
    assert meta["target_std"] == parent_meta["target_std"]

    more = replace(runs["half"], out=tmp_path / "w2.safetensors", steps=2, init=parent)
    distill(more)
    meta = read_safetensors_metadata(more.out)
    assert meta["steps"] == 2 and meta["total_steps"] == 4
    assert not torch.equal(
        load_file(str(more.out))["conv4.weight"], load_file(str(parent))["conv4.weight"]
    )


@pytest.mark.slow
def test_warm_start_from_another_target_warns_and_re_estimates(runs, tmp_path, caplog):
    parent = runs["half"].out
    torch.manual_seed(1)
    other_weights = tmp_path / "resnet18_other.safetensors"
    save_file(torchvision.models.resnet18(weights=None).state_dict(), str(other_weights))
    cfg = replace(
        runs["half"],
        out=tmp_path / "other.safetensors",
        steps=0,
        init=parent,
        backbone_weights=other_weights,
    )
    with caplog.at_level(logging.WARNING):
        distill(cfg)
    assert "only a starting point" in caplog.text
    meta = read_safetensors_metadata(cfg.out)
    assert meta["init"]["same_target"] is False
    assert meta["target_mean"] != read_safetensors_metadata(parent)["target_mean"]


def test_distill_cli_rejects_a_missing_init_teacher(images, tmp_path, backbone_weights, capsys):
    code = distill_cli(
        images,
        tmp_path / "t.safetensors",
        backbone_weights,
        "--init",
        str(tmp_path / "absent.safetensors"),
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--init" in err and "not found" in err
