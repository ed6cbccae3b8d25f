"""Import EfficientAD models trained with anomalib into our model-directory format.

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

import json
import logging
import math
import pathlib
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from models.checkpoint import META_FILE, CheckpointError, load_state, save_checkpoint, sha256_file
from models.networks import TEACHER_CHANNELS, EfficientAD, ModelSize, check_input_size

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
DEFAULT_IMAGE_SIZE = (256, 256)
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


def _hparam_size(ckpt: AnomalibCheckpoint) -> ModelSize | None:
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


def _check_statistics(model: EfficientAD, path: Path) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AnomalibImportError(f"{path}: {name} contains NaN or infinite values")
    std = model.mean_std.std
    if not bool((std != 0).any()):
        raise AnomalibImportError(
            f"{path}: mean_std is not set (all zeros). anomalib fills the teacher channel "
            "statistics when training starts; this looks like an untrained model."
        )
    if not bool((std > 0).all()):
        bad = int((std <= 0).sum())
        raise AnomalibImportError(f"{path}: mean_std.std has {bad} channels <= 0")
    q = model.quantiles
    for a, b in (("qa_st", "qb_st"), ("qa_ae", "qb_ae")):
        qa, qb = float(getattr(q, a)), float(getattr(q, b))
        if not qb > qa:
            raise AnomalibImportError(
                f"{path}: map quantiles are not set ({a}={qa}, {b}={qb}). anomalib computes them "
                "when validation starts; run validation (e.g. engine.fit with a validation set) "
                "before exporting the model."
            )


def _plain(value: Any) -> Any:
    """JSON-safe copy of hyper-parameters (paths and enums as strings, NaN as None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _plain(float(value))
    return str(value)


def _score_range(threshold: float, known: AnomalibThreshold | None) -> tuple[float, float, str]:
    if known is not None and known.image_min is not None and known.image_max is not None:
        return known.image_min, known.image_max, "anomalib post_processor image_min/image_max"
    if threshold > 0:
        return 0.0, 2.0 * threshold, "derived: [0, 2 x threshold] (anomalib range unknown)"
    return threshold - 0.5, threshold + 0.5, "derived: threshold +- 0.5 (anomalib range unknown)"


def import_anomalib(
    path: Path,
    out: Path,
    *,
    name: str | None = None,
    image_size: tuple[int, int] | None = None,
    threshold: float | None = None,
    model_size: ModelSize | None = None,
    padding: bool | None = None,
    pad_maps: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an anomalib EfficientAD file into a model directory; returns ``out``.

    ``None`` means "from the file": model size from the weight shapes, padding / pad_maps from
    the Lightning hyper-parameters (else anomalib's defaults False / True), image size from the
    saved pre-processor ``Resize`` (else 256x256), threshold from the post-processor. A model
    without any threshold is refused (nothing is written): it could not decide good from bad.
    """
    path, out = Path(path), Path(out)
    if (out / META_FILE).exists() and not overwrite:
        raise AnomalibImportError(f"{out}: already holds a model; choose another --out or --force")
    ckpt = read_anomalib_checkpoint(path)
    hp = ckpt.hyper_parameters

    detected = detect_model_size(ckpt)
    declared = _hparam_size(ckpt)
    if declared is not None and declared != detected:
        raise AnomalibImportError(
            f"{path}: hyper_parameters say model_size={declared!r} but the weights are "
            f"EfficientAD-{detected.upper()}"
        )
    if model_size is not None and model_size != detected:
        raise AnomalibImportError(
            f"{path}: --model-size {model_size} requested but the weights are "
            f"EfficientAD-{detected.upper()}"
        )
    channels = hp.get("teacher_out_channels", TEACHER_CHANNELS)
    if int(channels) != TEACHER_CHANNELS:
        raise AnomalibImportError(
            f"{path}: teacher_out_channels={channels}; only {TEACHER_CHANNELS} is supported"
        )

    sources: dict[str, str] = {"model_size": "weight shapes"}
    if padding is None:
        padding = bool(hp["padding"]) if "padding" in hp else False
        sources["padding"] = "hyper_parameters" if "padding" in hp else "default (not recorded)"
    else:
        sources["padding"] = "argument"
    if pad_maps is None:
        pad_maps = bool(hp["pad_maps"]) if "pad_maps" in hp else True
        sources["pad_maps"] = "hyper_parameters" if "pad_maps" in hp else "default (not recorded)"
    else:
        sources["pad_maps"] = "argument"
    for key, value in (("padding", padding), ("pad_maps", pad_maps)):
        if sources[key] == "argument" and key in hp and bool(hp[key]) != value:
            log.warning("%s=%s overrides the checkpoint's %s=%s", key, value, key, hp[key])
    if sources["padding"].startswith("default"):
        log.warning(
            "%s does not record 'padding'; assuming anomalib's default False "
            "(pass --padding if the model was trained with padding=True)",
            path.name,
        )
    saved_size = anomalib_image_size(ckpt)
    if image_size is None:
        image_size = saved_size or DEFAULT_IMAGE_SIZE
        sources["image_size"] = "pre-processor Resize" if saved_size else "default 256x256"
    else:
        image_size = (int(image_size[0]), int(image_size[1]))
        sources["image_size"] = "argument"
        if saved_size and saved_size != image_size:
            log.warning(
                "image size %s overrides the checkpoint's Resize %s", image_size, saved_size
            )
    try:
        check_input_size(*image_size)
    except ValueError as exc:
        raise AnomalibImportError(str(exc)) from exc

    model = EfficientAD(detected, padding=padding, pad_maps=pad_maps)
    try:
        load_state(model, ckpt.model_state, source=str(path))
    except CheckpointError as exc:
        raise AnomalibImportError(f"{exc} (EfficientAD-{detected.upper()})") from exc
    model.eval()
    _check_statistics(model, path)

    known = anomalib_threshold(ckpt)
    if threshold is not None:
        if not math.isfinite(threshold):
            raise AnomalibImportError(f"--threshold must be a finite number, got {threshold}")
        value, method = float(threshold), "fixed (--threshold)"
    elif known is not None:
        value, method = known.value, known.method
    else:
        raise AnomalibImportError(
            f"{path}: no image threshold in the file (anomalib computes it during validation; "
            "a plain model state dict never has one). A model without a threshold cannot decide "
            "good from bad, so nothing was written: pass --threshold on the raw score "
            "(the maximum of the quantile-normalised anomaly map). Without a known value, import "
            "with a provisional one, run `efficientad eval` on labelled images (it reports the "
            "F1-optimal threshold) and re-import with that value and --force."
        )
    score_min, score_max, range_method = _score_range(value, known)

    sha = sha256_file(path)
    meta = {
        "name": name or out.name,
        "version": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "image_size": [image_size[0], image_size[1]],
        "threshold": value,
        "threshold_method": method,
        "score_min": score_min,
        "score_max": score_max,
        "score_range_method": range_method,
        "quantiles": {
            k: float(getattr(model.quantiles, k)) for k in ("qa_st", "qb_st", "qa_ae", "qb_ae")
        },
        "teacher": {"source": "anomalib", "location": path.name, "sha256": sha},
        "provenance": {
            "description": "imported from anomalib",
            "file": path.name,
            "sha256": sha,
            "format": ckpt.kind,
            "lightning_version": _plain(ckpt.lightning_version),
            "settings_from": sources,
            "anomalib_hyper_parameters": _plain(hp),
            "anomalib_threshold": _plain(known.details) if known else None,
            "ignored_entries": sorted(ckpt.extra_state)[:50],
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    json.dumps(meta)  # fail before writing if anything is not JSON
    saved = save_checkpoint(model, meta, out)
    log.info(
        "imported %s (EfficientAD-%s, padding=%s) -> %s; threshold %.6g (%s)",
        path.name,
        detected.upper(),
        padding,
        saved,
        value,
        method,
    )
    return saved
