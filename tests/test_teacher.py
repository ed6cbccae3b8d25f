"""Teacher sources: anomalib / nelson1425 / rximg files, our checkpoints, shipped, random, official.

The official download is exercised offline through a file:// URL pointing at a zip built here
with anomalib's release layout.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.checkpoint import WEIGHTS_FILE, save_checkpoint
from models.networks import EfficientAD, PDNMedium, PDNSmall, imagenet_normalize
from models.teacher import (
    SHIPPED,
    RandomTeacherWarning,
    TeacherError,
    resolve_teacher,
)


def nelson_pdn_small() -> nn.Sequential:
    """nelson1425's get_pdn_small(384): conv, relu, pool, conv, relu, pool, conv, relu, conv."""
    return nn.Sequential(
        nn.Conv2d(3, 128, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(128, 256, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 256, 3),
        nn.ReLU(),
        nn.Conv2d(256, 384, 4),
    )


def nelson_pdn_medium() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 256, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 512, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(512, 512, 1),
        nn.ReLU(),
        nn.Conv2d(512, 512, 3),
        nn.ReLU(),
        nn.Conv2d(512, 384, 4),
        nn.ReLU(),
        nn.Conv2d(384, 384, 1),
    )


NELSON_TO_ANOMALIB = {
    "0": "conv1",
    "3": "conv2",
    "6": "conv3",
    "8": "conv4",
    "10": "conv5",
    "12": "conv6",
}


def anomalib_state(seq: nn.Sequential) -> dict[str, torch.Tensor]:
    """The same weights under anomalib's names (what anomalib's PR #2015 did to nelson's files)."""
    out = {}
    for key, value in seq.state_dict().items():
        idx, kind = key.split(".")
        out[f"{NELSON_TO_ANOMALIB[idx]}.{kind}"] = value.clone()
    return out


@pytest.fixture(scope="module")
def nelson_small() -> nn.Sequential:
    torch.manual_seed(11)
    return nelson_pdn_small().eval()


def assert_same_weights(pdn: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = pdn.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_nelson_and_anomalib_pth_files_give_identical_teachers(nelson_small, tmp_path):
    nelson_file = tmp_path / "teacher_small.pth"
    torch.save(nelson_small.state_dict(), nelson_file)
    assert sorted(nelson_small.state_dict()) == sorted(
        f"{i}.{k}" for i in (0, 3, 6, 8) for k in ("weight", "bias")
    )
    anomalib_file = tmp_path / "pretrained_teacher_small.pth"
    torch.save(anomalib_state(nelson_small), anomalib_file)

    from_nelson, info_n = resolve_teacher(nelson_file, "s")
    from_anomalib, info_a = resolve_teacher(anomalib_file, "s")
    expected = anomalib_state(nelson_small)
    assert_same_weights(from_nelson, expected)
    assert_same_weights(from_anomalib, expected)
    assert info_n.source == info_a.source == "file"
    assert info_n.sha256 == hashlib.sha256(nelson_file.read_bytes()).hexdigest()
    assert not from_nelson.training

    # same function: nelson normalises in the transform, our PDN inside forward
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(from_nelson(x), nelson_small(imagenet_normalize(x)), atol=1e-5)


def test_nelson_medium_keys_map_to_conv1_to_conv6(tmp_path):
    torch.manual_seed(12)
    seq = nelson_pdn_medium().eval()
    path = tmp_path / "teacher_medium.pth"
    torch.save(seq.state_dict(), path)
    pdn, _ = resolve_teacher(path, "m")
    assert isinstance(pdn, PDNMedium)
    assert_same_weights(pdn, anomalib_state(seq))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pdn(x), seq(imagenet_normalize(x)), atol=1e-5)
    with pytest.raises(TeacherError, match="PDN-S"):
        resolve_teacher(path, "s")  # indices 10, 12 do not exist in a small PDN


def test_rximg_pdn_prefix_loads(nelson_small, tmp_path):
    expected = anomalib_state(nelson_small)
    path = tmp_path / "best_teacher.pth"
    torch.save({f"pdn.{k}": v for k, v in expected.items()}, path)
    pdn, _ = resolve_teacher(path, "s")
    assert_same_weights(pdn, expected)


def test_our_checkpoint_directory_and_safetensors_teacher_load(tmp_path):
    torch.manual_seed(13)
    model = EfficientAD("s")
    model.mean_std.std.fill_(1.0)
    card = {"name": "x", "version": "1", "image_size": [256, 256], "threshold": 1.0}
    card |= {"score_min": 0.0, "score_max": 2.0}
    model_dir = save_checkpoint(model, card, tmp_path / "model")
    pdn, info = resolve_teacher(model_dir, "s")
    assert_same_weights(pdn, model.teacher.state_dict())
    assert info.source == "checkpoint"
    assert info.sha256 == hashlib.sha256((model_dir / WEIGHTS_FILE).read_bytes()).hexdigest()

    plain = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.teacher.state_dict().items()}, str(plain))
    pdn, info = resolve_teacher(plain, "s")
    assert_same_weights(pdn, model.teacher.state_dict())
    assert info.source == "file"


def test_bad_teacher_files_are_refused_clearly(nelson_small, tmp_path):
    with pytest.raises(TeacherError, match="not found"):
        resolve_teacher(tmp_path / "absent.pth", "s")
    medium = tmp_path / "medium_as_small.pth"
    torch.manual_seed(14)
    torch.save(PDNMedium().state_dict(), medium)
    with pytest.raises(TeacherError, match="does not fit"):
        resolve_teacher(medium, "s")
    whole = tmp_path / "teacher_final.pth"  # nelson's training output: a pickled module
    torch.save(nelson_small, whole)
    with pytest.raises(TeacherError, match="weights_only"):
        resolve_teacher(whole, "s")
    odd = tmp_path / "odd.pth"
    torch.save({"encoder.layer.weight": torch.zeros(1)}, odd)
    with pytest.raises(TeacherError, match="unrecognised"):
        resolve_teacher(odd, "s")


def test_corrupt_safetensors_teacher_gives_teacher_error(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(TeacherError):
        resolve_teacher(broken, "s")


def test_shipped_teacher_loads_with_its_provenance():
    pdn, info = resolve_teacher("shipped", "s")
    assert isinstance(pdn, PDNSmall) and not pdn.training
    assert info.source == "shipped"
    assert info.sha256 == hashlib.sha256(SHIPPED["s"].read_bytes()).hexdigest()
    assert info.details["backbone"] == "mobilenet_v2"
    assert info.details["steps"] > 0 and info.details["num_images"] > 0
    assert all(torch.isfinite(p).all() for p in pdn.parameters())
    with pytest.raises(TeacherError, match="no shipped PDN-M"):
        resolve_teacher("shipped", "m")


def test_random_teacher_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(RandomTeacherWarning, match="RANDOM"):
        pdn, info = resolve_teacher("random", "s")
    assert info.source == "random" and info.sha256 is None
    assert "RANDOM" in caplog.text
    assert isinstance(pdn, PDNSmall)


# --------------------------------------------------------------------------------------------
# official release download (offline, file:// URL)


@pytest.fixture(scope="module")
def release_zip(nelson_small, tmp_path_factory) -> tuple[Path, str]:
    """A zip laid out like anomalib's efficientad_pretrained_weights.zip (small teacher only)."""
    folder = tmp_path_factory.mktemp("release")
    pth = folder / "pretrained_teacher_small.pth"
    torch.save(anomalib_state(nelson_small), pth)
    archive = folder / "efficientad_pretrained_weights.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(pth, "efficientad_pretrained_weights/pretrained_teacher_small.pth")
    pth.unlink()
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture
def official_env(release_zip, tmp_path, monkeypatch) -> tuple[Path, Path, str]:
    archive, sha = release_zip
    source = tmp_path / "mirror" / archive.name
    source.parent.mkdir()
    source.write_bytes(archive.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("EFFICIENTAD_TEACHER_URL", source.as_uri())
    monkeypatch.setenv("EFFICIENTAD_TEACHER_SHA256", sha)
    monkeypatch.setenv("EFFICIENTAD_CACHE_DIR", str(cache))
    return source, cache, sha


def test_official_download_verifies_and_caches(nelson_small, official_env, monkeypatch):
    source, cache, _ = official_env
    pdn, info = resolve_teacher("official", "s")
    assert_same_weights(pdn, anomalib_state(nelson_small))
    assert info.source == "official"
    cached = Path(info.location)
    assert cached.is_file() and cache in cached.parents
    assert cached.name == "pretrained_teacher_small.pth"
    assert info.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()

    source.unlink()  # the second call must not need the URL
    pdn2, info2 = resolve_teacher("official", "s")
    assert info2.location == info.location
    assert_same_weights(pdn2, anomalib_state(nelson_small))
    # auto prefers the cached official teacher
    _, info3 = resolve_teacher("auto", "s")
    assert info3.source == "official"


def test_official_provenance_names_the_url_actually_used(official_env):
    source, _, _ = official_env
    _, info = resolve_teacher("official", "s")
    assert info.details["url"] == source.as_uri()


def test_official_wrong_sha256_is_refused_and_leaves_no_file(official_env, monkeypatch):
    _, cache, _ = official_env
    monkeypatch.setenv("EFFICIENTAD_TEACHER_SHA256", "0" * 64)
    with pytest.raises(TeacherError, match=r"sha256 .* expected 0{64}"):
        resolve_teacher("official", "s")
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_official_archive_without_the_size_is_a_clear_error(official_env):
    with pytest.raises(TeacherError, match=r"pretrained_teacher_medium\.pth"):
        resolve_teacher("official", "m")


def test_auto_falls_back_to_shipped_when_unreachable(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EFFICIENTAD_TEACHER_URL", (tmp_path / "nowhere.zip").as_uri())
    monkeypatch.setenv("EFFICIENTAD_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        _, info = resolve_teacher("auto", "s")
    assert info.source == "shipped"
    assert "official teacher unavailable" in caplog.text
    with pytest.raises(TeacherError, match="official teacher unavailable"):
        resolve_teacher("official", "s")
    with pytest.raises(TeacherError, match="no offline PDN-M"):
        resolve_teacher("auto", "m")
