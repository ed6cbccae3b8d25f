"""Portable checkpoints: safetensors weights plus JSON metadata, never pickle on the load path.

A trained model is a directory ``MODEL/`` holding ``model.safetensors`` (anomalib key names) and
``model.json`` (everything else inference needs: size, padding, image size, threshold, provenance).
A teacher is a single ``.safetensors`` file whose keys are ``conv1.weight``.. like anomalib's
teacher files, with its provenance in the safetensors header metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from efficientad import __version__
from models.networks import EfficientAD

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "efficientad-line/model"
TEACHER_FORMAT = "efficientad-line/teacher"
META_KEY = "efficientad"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the network."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contiguous(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def save_checkpoint(model: EfficientAD, meta: dict[str, Any], out_dir: Path) -> Path:
    """Write MODEL/model.safetensors + MODEL/model.json; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(_contiguous(model.state_dict(), None), str(tmp))
    tmp.replace(weights)
    full_meta = {
        "format": FORMAT,
        "format_version": 1,
        "package_version": __version__,
        "model_size": model.size,
        "padding": model.padding,
        "pad_maps": model.pad_maps,
        **meta,
        "weights_sha256": sha256_file(weights),
    }
    tmp_meta = out_dir / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(full_meta, indent=2, sort_keys=True))
    tmp_meta.replace(out_dir / META_FILE)
    return out_dir


def read_safetensors(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated file) is ``error``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise error(f"{path}: not a readable safetensors file ({exc})") from exc


def read_metadata(path: Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / META_FILE if path.is_dir() else path.with_name(META_FILE)
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META_FILE} next to the weights; not a model checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_checkpoint(path: Path, verify_hash: bool = True) -> tuple[EfficientAD, dict[str, Any]]:
    """Load a model directory (or its model.safetensors) onto the CPU in eval mode."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} not found")
    meta = read_metadata(path)
    if verify_hash and meta.get("weights_sha256") not in (None, sha256_file(weights)):
        raise CheckpointError(f"{weights}: sha256 does not match the one recorded in {META_FILE}")
    size = meta.get("model_size")
    if size not in ("s", "m"):
        raise CheckpointError(f"{path}: model_size must be 's' or 'm', got {size!r}")
    model = EfficientAD(
        size, padding=bool(meta.get("padding", False)), pad_maps=bool(meta.get("pad_maps", True))
    )
    load_state(model, read_safetensors(weights, CheckpointError), source=str(weights))
    model.eval()
    return model, meta


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/inf in any float tensor: such a model loads, scores NaN and never alarms."""
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise CheckpointError(
                f"{source}: {key} contains NaN or infinite values ({bad} of {tensor.numel()}); "
                "the training run diverged or the file is corrupt"
            )


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists missing, unexpected and mis-shaped keys.

    Non-finite values are refused too (``check_finite``): a NaN weight fails here, at load,
    instead of silently at every inference.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs net {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:4]}")
        raise CheckpointError(f"{source}: does not fit the network: " + "; ".join(parts))
    check_finite(state, source)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def save_teacher(
    teacher: nn.Module, meta: dict[str, Any], path: Path, dtype: torch.dtype | None = None
) -> Path:
    """One safetensors file with anomalib teacher keys (conv1..) and provenance in its header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        META_KEY: json.dumps({"format": TEACHER_FORMAT, "package_version": __version__, **meta})
    }
    tmp = path.with_suffix(".tmp")
    save_file(_contiguous(teacher.state_dict(), dtype), str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_safetensors_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    raw = header.get(META_KEY)
    return json.loads(raw) if raw else {}
