"""Reading EfficientAD checkpoints written by anomalib: weights, threshold, score range, size.

Accepted inputs, always read with ``torch.load(weights_only=True)`` (nothing pickled is executed):

- a Lightning ``.ckpt`` written by anomalib (``state_dict`` with ``model.`` keys, plus the
  post-processor buffers and ``hyper_parameters``);
- the state dict of the whole anomalib Lightning module (``model.`` keys, ``post_processor.``
  buffers), e.g. ``torch.save(ckpt["state_dict"], ...)``;
- a plain ``EfficientAdModel`` state dict (``teacher.conv1.weight`` ...).

What anomalib stores besides the network (read from the wheel sources):

- 2.x ``PostProcessor`` buffers: ``post_processor._image_threshold`` / ``_pixel_threshold`` and
  ``post_processor.image_min`` / ``image_max`` (``pixel_min``/``pixel_max``), all in raw score
  units, NaN until validation ran; 2.7 also writes ``checkpoint["anomalib_post_processor_config"]``
  (``enable_normalization``, ``enable_threshold_matching``, ``image_sensitivity``...) and
  ``checkpoint["anomalib_pre_processor_config"]`` (the ``Resize`` transform as plain data).
- 1.x: ``image_threshold.value``, ``pixel_threshold.value`` and
  ``normalization_metrics.pred_scores.min`` / ``.max`` (plus ``*_class`` name strings).

anomalib's image decision is ``clamp((s - t) / (max - min) + 0.5, 0, 1) > 1 - sensitivity``; for
the default sensitivity 0.5 that is ``s > t``, and in general ``s > t + (0.5 - sensitivity) *
(max - min)``, which is the raw threshold we store. Our normalised score uses the same formula, so
with min/max carried over it equals anomalib's ``pred_score`` after post-processing.
"""

from __future__ import annotations

import logging
import math
import pathlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from models.networks import ModelSize

__all__ = [
    "AnomalibCheckpoint",
    "AnomalibImportError",
    "AnomalibThreshold",
    "anomalib_image_size",
    "anomalib_threshold",
    "detect_model_size",
    "hparam_size",
    "read_anomalib_checkpoint",
]

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
DEFAULT_SENSITIVITY = 0.5
SourceKind = Literal["lightning-checkpoint", "lightning-state-dict", "model-state-dict"]

# Plain-data types anomalib itself allowlists for its weights_only loads (anomalib.utils.
# serialization): its enums are mapped to ``str`` (pickle calls ``Enum(value)``, we keep the
# value), paths to pure paths, numpy leaf types of optimizer/scheduler state to numpy's own.
_ENUM_GLOBALS = (
    "anomalib.models.image.efficient_ad.torch_model.EfficientAdModelSize",
    "anomalib.models.efficient_ad.torch_model.EfficientAdModelSize",
    "anomalib.PrecisionType",
    "anomalib.TaskType",
    "anomalib.LearningType",
)


class AnomalibImportError(ValueError):
    """The file is not an importable anomalib EfficientAD model (the message says why)."""


def _numpy_globals() -> list[Any]:
    scalar = np.float64(0).__reduce__()[0]
    reconstruct = np.empty(0).__reduce__()[0]
    dtype_classes = [
        cls
        for cls in vars(np.dtypes).values()
        if isinstance(cls, type) and issubclass(cls, np.dtype)
    ]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.dtype,
        np.ndarray,
        *dtype_classes,
    ]


def _safe_globals() -> list[Any]:
    return [
        *((str, name) for name in _ENUM_GLOBALS),
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
        (pathlib.PureWindowsPath, "pathlib.WindowsPath"),
        *_numpy_globals(),
    ]


def _export_hint(path: Path) -> str:
    return (
        "If you trust the file, export its weights as plain tensors in the environment that "
        "trained it and import that file instead:\n"
        f"  python -c \"import torch; ckpt = torch.load('{path}', weights_only=False); "
        "torch.save(ckpt['state_dict'], 'efficientad_state.pt')\"\n"
        "(the state dict keeps the post-processor threshold, so it still carries over)."
    )


def _torch_load(path: Path) -> Any:
    """weights_only load with anomalib's plain-data allowlist; refuses anything else."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # only used to improve the message
            unsafe = []
        if not unsafe and "Unsupported global" not in str(exc):
            reason = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
            raise AnomalibImportError(
                f"{path}: not a readable PyTorch checkpoint ({reason[:200]})"
            ) from exc
        what = f" ({', '.join(unsafe[:6])}{', ...' if len(unsafe) > 6 else ''})" if unsafe else ""
        raise AnomalibImportError(
            f"{path}: refused: the file contains pickled Python objects that are not plain "
            f"data{what}. Checkpoints are read with torch.load(weights_only=True) and pickled "
            "code is never executed. Lightning checkpoints of anomalib < 2.7 may hold live "
            "objects (e.g. transforms) this way. " + _export_hint(path)
        ) from exc
    except Exception as exc:  # torch raises KeyError, RuntimeError... on non-checkpoints
        raise AnomalibImportError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


@dataclass
class AnomalibCheckpoint:
    """What an anomalib file holds, split into the network and everything around it."""

    path: Path
    kind: SourceKind
    model_state: dict[str, torch.Tensor]
    extra_state: dict[str, Any] = field(default_factory=dict)  # non-network entries
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    post_processor_config: dict[str, Any] = field(default_factory=dict)
    pre_processor_config: dict[str, Any] | None = None
    lightning_version: str | None = None


def _split_state(path: Path, state: Mapping[str, Any]) -> tuple[dict, dict, bool]:
    prefixed = any(isinstance(k, str) and k.startswith(MODEL_PREFIX) for k in state)
    model: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise AnomalibImportError(f"{path}: state dict key {key!r} is not a string")
        if prefixed and not key.startswith(MODEL_PREFIX):
            extra[key] = value
            continue
        name = key[len(MODEL_PREFIX) :] if prefixed else key
        if not isinstance(value, torch.Tensor):
            raise AnomalibImportError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        model[name] = value
    return model, extra, prefixed


def read_anomalib_checkpoint(path: Path) -> AnomalibCheckpoint:
    """Load FILE safely and tell apart Lightning checkpoints, module and model state dicts."""
    path = Path(path)
    if not path.is_file():
        raise AnomalibImportError(f"{path}: file not found")
    obj = _torch_load(path)
    if isinstance(obj, torch.nn.Module):  # impossible under weights_only; kept for clarity
        raise AnomalibImportError(f"{path}: a pickled module, not a state dict")
    if not isinstance(obj, Mapping):
        raise AnomalibImportError(
            f"{path}: expected a Lightning checkpoint or a state dict, got {type(obj).__name__}"
        )
    if isinstance(obj.get("state_dict"), Mapping):
        model, extra, prefixed = _split_state(path, obj["state_dict"])
        if not prefixed:
            raise AnomalibImportError(
                f"{path}: Lightning checkpoint without 'model.' keys; not an anomalib model"
            )
        hparams = obj.get("hyper_parameters") or {}
        return AnomalibCheckpoint(
            path=path,
            kind="lightning-checkpoint",
            model_state=model,
            extra_state=extra,
            hyper_parameters=dict(hparams) if isinstance(hparams, Mapping) else {},
            post_processor_config=dict(obj.get("anomalib_post_processor_config") or {}),
            pre_processor_config=obj.get("anomalib_pre_processor_config"),
            lightning_version=obj.get("pytorch-lightning_version"),
        )
    model, extra, prefixed = _split_state(path, obj)
    return AnomalibCheckpoint(
        path=path,
        kind="lightning-state-dict" if prefixed else "model-state-dict",
        model_state=model,
        extra_state=extra,
    )


def detect_model_size(ckpt: AnomalibCheckpoint) -> ModelSize:
    state = ckpt.model_state
    if "teacher.conv1.weight" not in state:
        sample = sorted(state)[:6]
        raise AnomalibImportError(
            f"{ckpt.path}: not an EfficientAD state dict: no 'teacher.conv1.weight' "
            f"(first keys: {sample})"
        )
    return "m" if "teacher.conv5.weight" in state else "s"


def hparam_size(ckpt: AnomalibCheckpoint) -> ModelSize | None:
    """The model size the Lightning hyper-parameters declare (checked against the weights)."""
    value = ckpt.hyper_parameters.get("model_size")
    if value is None:
        return None
    text = str(value).lower()
    if text in ("s", "small"):
        return "s"
    if text in ("m", "medium"):
        return "m"
    raise AnomalibImportError(f"{ckpt.path}: unknown model_size {value!r} in hyper_parameters")


def _scalar(ckpt: AnomalibCheckpoint, *keys: str) -> float | None:
    """First finite scalar among ``keys`` in the non-network entries."""
    for key in keys:
        value = ckpt.extra_state.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            number = float(value.double())
            if math.isfinite(number):
                return number
    return None


@dataclass(frozen=True)
class AnomalibThreshold:
    """anomalib's image decision expressed on our raw score."""

    value: float
    method: str
    image_min: float | None
    image_max: float | None
    details: dict[str, Any]


def anomalib_threshold(ckpt: AnomalibCheckpoint) -> AnomalibThreshold | None:
    """The raw-score threshold anomalib's post-processor applies, or None when it has none."""
    cfg = ckpt.post_processor_config
    matching = bool(cfg.get("enable_threshold_matching", True))
    normalization = bool(cfg.get("enable_normalization", True))
    sensitivity = float(cfg.get("image_sensitivity", DEFAULT_SENSITIVITY))
    image_t = _scalar(ckpt, "post_processor._image_threshold", "image_threshold.value")
    pixel_t = _scalar(ckpt, "post_processor._pixel_threshold", "pixel_threshold.value")
    lo = _scalar(
        ckpt,
        "post_processor.image_min",
        "normalization_metrics.pred_scores.min",
        "normalization_metrics.min",
    )
    hi = _scalar(
        ckpt,
        "post_processor.image_max",
        "normalization_metrics.pred_scores.max",
        "normalization_metrics.max",
    )
    if lo is not None and hi is not None and not hi > lo:
        lo = hi = None
    details = {
        "image_threshold": image_t,
        "pixel_threshold": pixel_t,
        "image_min": lo,
        "image_max": hi,
        "image_sensitivity": sensitivity,
        "enable_normalization": normalization,
        "enable_threshold_matching": matching,
    }
    if image_t is not None:
        base, method = image_t, "anomalib image threshold"
    elif pixel_t is not None and matching:
        base, method = pixel_t, "anomalib pixel threshold (threshold matching)"
    else:
        return None
    value = base
    if sensitivity != DEFAULT_SENSITIVITY and normalization and lo is not None and hi is not None:
        value = base + (DEFAULT_SENSITIVITY - sensitivity) * (hi - lo)
        method += f", image_sensitivity={sensitivity}"
    return AnomalibThreshold(value, method, lo, hi, details)


def anomalib_image_size(ckpt: AnomalibCheckpoint) -> tuple[int, int] | None:
    """(H, W) of the ``Resize`` in anomalib's saved pre-processor spec (anomalib >= 2.7)."""

    def find(spec: Any) -> tuple[int, int] | None:
        if isinstance(spec, Mapping):
            if str(spec.get("class_path", "")).endswith(".Resize"):
                size = (spec.get("init_args") or {}).get("size")
                if isinstance(size, list | tuple) and len(size) == 2:
                    return int(size[0]), int(size[1])
                return None  # int / [N]: aspect-preserving resize, no fixed model size
            for value in spec.values():
                found = find(value)
                if found:
                    return found
        if isinstance(spec, list | tuple):
            for value in spec:
                found = find(value)
                if found:
                    return found
        return None

    return find(ckpt.pre_processor_config) if ckpt.pre_processor_config else None
