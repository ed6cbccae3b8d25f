"""Import EfficientAD models trained with anomalib into our model-directory format.

``models.anomalib_checkpoint`` reads the file (always with ``torch.load(weights_only=True)``:
nothing pickled is executed) and what anomalib stores besides the network; this module checks the
weights against our network and writes the model directory with its card: model size from the
weights, padding / pad_maps from the hyper-parameters, image size from the saved pre-processor,
threshold and score range from the post-processor (options override each).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.anomalib_checkpoint import (
    AnomalibImportError,
    AnomalibThreshold,
    anomalib_image_size,
    anomalib_threshold,
    detect_model_size,
    hparam_size,
    read_anomalib_checkpoint,
)
from models.checkpoint import META_FILE, CheckpointError, load_state, save_checkpoint, sha256_file
from models.model_card import DEFAULT_IMAGE_SIZE, ModelCard, TeacherProvenance, check_image_size
from models.networks import TEACHER_CHANNELS, EfficientAD, ModelSize

__all__ = ["AnomalibImportError", "import_anomalib"]

log = logging.getLogger(__name__)


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
    declared = hparam_size(ckpt)
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
        sources["image_size"] = (
            "pre-processor Resize"
            if saved_size
            else f"default {DEFAULT_IMAGE_SIZE[0]}x{DEFAULT_IMAGE_SIZE[1]}"
        )
    else:
        image_size = (int(image_size[0]), int(image_size[1]))
        sources["image_size"] = "argument"
        if saved_size and saved_size != image_size:
            log.warning(
                "image size %s overrides the checkpoint's Resize %s", image_size, saved_size
            )
    try:
        check_image_size(*image_size)
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
    provenance = {
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
    }
    json.dumps(provenance)  # fail before writing if anything is not JSON
    try:
        card = ModelCard.create(
            name=name or out.name,
            version=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            model_size=detected,
            padding=padding,
            pad_maps=pad_maps,
            image_size=image_size,
            threshold=value,
            threshold_method=method,
            score_min=score_min,
            score_max=score_max,
            score_range_method=range_method,
            quantiles={
                k: float(getattr(model.quantiles, k)) for k in ("qa_st", "qb_st", "qa_ae", "qb_ae")
            },
            teacher=TeacherProvenance(source="anomalib", location=path.name, sha256=sha),
            provenance=provenance,
        )
    except CheckpointError as exc:  # e.g. a NaN min/max carried over from the checkpoint
        raise AnomalibImportError(f"{path}: {exc}") from exc
    saved = save_checkpoint(model, card, out)
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
