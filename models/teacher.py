"""Where a teacher comes from: official anomalib release, files in three key layouts, ours, random.

``auto`` prefers the official teacher (cached, or downloaded with a sha256 check) and falls back to
the PDN-S teacher shipped with the package when the machine is offline.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    load_state,
    read_safetensors,
    read_safetensors_metadata,
    sha256_file,
)
from models.networks import TEACHER_CHANNELS, ModelSize, build_pdn

log = logging.getLogger(__name__)

OFFICIAL_URL = (
    "https://github.com/open-edge-platform/anomalib/releases/download/"
    "efficientad_pretrained_weights/efficientad_pretrained_weights.zip"
)
OFFICIAL_SHA256 = "c09aeaa2b33f244b3261a5efdaeae8f8284a949470a4c5a526c61275fe62684a"
OFFICIAL_MEMBERS = {"s": "pretrained_teacher_small.pth", "m": "pretrained_teacher_medium.pth"}
SHIPPED = {"s": Path(__file__).parent / "assets" / "teacher_small_mobilenet_v2.safetensors"}

# nelson1425 nn.Sequential indices -> anomalib names
_NELSON_INDEX = {
    "s": {"0": "conv1", "3": "conv2", "6": "conv3", "8": "conv4"},
    "m": {"0": "conv1", "3": "conv2", "6": "conv3", "8": "conv4", "10": "conv5", "12": "conv6"},
}


class TeacherError(ValueError):
    pass


class RandomTeacherWarning(UserWarning):
    pass


@dataclass(frozen=True)
class TeacherInfo:
    source: str  # official | shipped | file | checkpoint | random
    location: str
    sha256: str | None
    details: dict


def cache_dir() -> Path:
    env = os.environ.get("EFFICIENTAD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "efficientad"


def download(url: str, dest: Path, sha256: str, timeout: float = 20.0) -> Path:
    """Fetch url to dest atomically and verify its sha256; file:// URLs work for offline tests."""
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        got = sha256_file(tmp)
        if got != sha256:
            raise TeacherError(
                f"download of {url} has sha256 {got}, expected {sha256}; file discarded"
            )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_official(
    size: ModelSize, url: str | None = None, sha256: str | None = None
) -> tuple[Path, str]:
    """(path, url) of anomalib's released teacher for this size; downloads the zip once."""
    url = url or os.environ.get("EFFICIENTAD_TEACHER_URL", OFFICIAL_URL)
    sha256 = sha256 or os.environ.get("EFFICIENTAD_TEACHER_SHA256", OFFICIAL_SHA256)
    folder = cache_dir() / "official" / sha256[:16]
    member = OFFICIAL_MEMBERS[size]
    target = folder / member
    if target.is_file():
        return target, url
    archive = download(url, folder / "efficientad_pretrained_weights.zip", sha256)
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + member) or n == member]
        if not names:
            raise TeacherError(f"{archive} holds no {member} (members: {zf.namelist()[:10]})")
        with zf.open(names[0]) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".part").replace(target)
    return target, url


def _normalise_keys(state: dict[str, torch.Tensor], size: ModelSize) -> dict[str, torch.Tensor]:
    """Map nelson1425 (0,3,6,..), rximg (pdn.convN) or checkpoint (teacher.convN) keys to convN."""
    keys = set(state)
    if all(re.fullmatch(r"conv\d+\.(weight|bias)", k) for k in keys):
        return state
    for prefix in ("teacher.", "pdn.", "model.teacher."):
        if any(k.startswith(prefix) for k in keys):
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            return {k: v for k, v in sub.items() if re.fullmatch(r"conv\d+\.(weight|bias)", k)}
    if all(re.fullmatch(r"\d+\.(weight|bias)", k) for k in keys):
        mapping = _NELSON_INDEX[size]
        out = {}
        for key, value in state.items():
            idx, kind = key.split(".")
            if idx not in mapping:
                raise TeacherError(
                    f"nelson1425-style key {key!r} does not fit a PDN-{size.upper()}"
                )
            out[f"{mapping[idx]}.{kind}"] = value
        return out
    raise TeacherError(f"unrecognised teacher key layout: {sorted(keys)[:6]}")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, TeacherError)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads that are not plain tensors are refused
        raise TeacherError(
            f"{path}: not a plain state dict loadable with weights_only=True ({exc})"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise TeacherError(f"{path}: expected a dict of tensors")
    return obj


def load_teacher_file(path: Path, size: ModelSize) -> tuple[nn.Module, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise TeacherError(f"teacher file not found: {path}")
    state = _normalise_keys(_read_state(path), size)
    pdn = build_pdn(size, TEACHER_CHANNELS)
    try:
        load_state(pdn, state, source=str(path))
    except CheckpointError as exc:
        raise TeacherError(f"{exc} (is it a PDN-{size.upper()} teacher?)") from exc
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return pdn.eval(), meta


def resolve_teacher(source: str | Path, size: ModelSize) -> tuple[nn.Module, TeacherInfo]:
    """Build a frozen teacher from a source name or file path."""
    src = str(source)
    if src == "random":
        warnings.warn(
            "RANDOM TEACHER: features are untrained; anomaly detection will be poor. "
            "Use only for tests.",
            RandomTeacherWarning,
            stacklevel=2,
        )
        log.warning("using a RANDOM teacher (tests only)")
        return build_pdn(size, TEACHER_CHANNELS).eval(), TeacherInfo("random", "random", None, {})
    if src in ("auto", "official"):
        try:
            path, url = fetch_official(size)
            pdn, _ = load_teacher_file(path, size)
            return pdn, TeacherInfo("official", str(path), sha256_file(path), {"url": url})
        except (OSError, TeacherError) as exc:
            if src == "official":
                raise TeacherError(f"official teacher unavailable: {exc}") from exc
            if size not in SHIPPED:
                raise TeacherError(
                    f"official teacher unavailable ({exc}) and no offline PDN-{size.upper()} "
                    "teacher ships with the package; pass --teacher FILE"
                ) from exc
            log.warning("official teacher unavailable (%s); using the shipped offline teacher", exc)
            src = "shipped"
    if src == "shipped":
        if size not in SHIPPED:
            raise TeacherError(f"no shipped PDN-{size.upper()} teacher; pass --teacher FILE")
        path = SHIPPED[size]
        pdn, meta = load_teacher_file(path, size)
        details = {
            k: meta.get(k) for k in ("backbone", "steps", "batch", "final_loss", "num_images")
        }
        return pdn, TeacherInfo("shipped", path.name, sha256_file(path), details)
    path = Path(src)
    pdn, meta = load_teacher_file(path, size)
    kind = "checkpoint" if (path.is_dir() or path.name == WEIGHTS_FILE) else "file"
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    return pdn, TeacherInfo(kind, str(path), sha256_file(weights), {"meta": meta} if meta else {})
