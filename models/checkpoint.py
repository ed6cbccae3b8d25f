"""Portable checkpoints: safetensors weights plus JSON metadata, never pickle on the load path.

A trained model is a directory ``MODEL/`` holding ``model.safetensors`` (anomalib key names) and
``model.json``, the model card (``models.model_card``: size, padding, image size, threshold,
provenance).
A teacher is a single ``.safetensors`` file whose keys are ``conv1.weight``.. like anomalib's
teacher files, with its provenance in the safetensors header metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.model_card import FORMAT, META_FILE, CheckpointError, ModelCard
from models.networks import EfficientAD
from models.version import __version__

__all__ = [
    "FORMAT",
    "META_FILE",
    "TEACHER_FORMAT",
    "WEIGHTS_FILE",
    "CheckpointError",
    "check_finite",
    "load_checkpoint",
    "load_state",
    "read_safetensors",
    "read_safetensors_metadata",
    "save_checkpoint",
    "save_teacher",
    "sha256_file",
]

WEIGHTS_FILE = "model.safetensors"
TEACHER_FORMAT = "efficientad-line/teacher"
META_KEY = "efficientad"


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


def save_checkpoint(model: EfficientAD, card: ModelCard | Mapping[str, Any], out_dir: Path) -> Path:
    """Write MODEL/model.safetensors + MODEL/model.json (the card); returns the directory.

    ``card`` may be a mapping of card fields; the network's size and padding flags fill in what
    it leaves out. The card is validated before anything is written, and the weights' sha256 is
    recorded in it after they are.
    """
    out_dir = Path(out_dir)
    if not isinstance(card, ModelCard):
        fields = {"model_size": model.size, "padding": model.padding, "pad_maps": model.pad_maps}
        card = ModelCard.from_mapping({**fields, **card}, out_dir / META_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(_contiguous(model.state_dict(), None), str(tmp))
    tmp.replace(weights)
    card.model_copy(update={"weights_sha256": sha256_file(weights)}).save(out_dir)
    return out_dir


def read_safetensors(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated file) is ``error``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise error(f"{path}: not a readable safetensors file ({exc})") from exc


def load_checkpoint(path: Path, verify_hash: bool = True) -> tuple[EfficientAD, ModelCard]:
    """Load a model directory (or its model.safetensors) onto the CPU in eval mode."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} not found")
    card = ModelCard.load(path)
    if verify_hash and card.weights_sha256 not in ("", sha256_file(weights)):
        raise CheckpointError(f"{weights}: sha256 does not match the one recorded in {META_FILE}")
    model = EfficientAD(card.model_size, padding=card.padding, pad_maps=card.pad_maps)
    load_state(model, read_safetensors(weights, CheckpointError), source=str(weights))
    model.eval()
    return model, card


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
