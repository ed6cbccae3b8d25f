"""The model as the pipeline sees it: uint8 frames in, scores and anomaly maps out.

Nothing here knows about Redis; nothing in the pipeline needs to know about the networks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint
from models.model_card import ModelCard, field_error, finite_problem, image_size_problem
from models.networks import EfficientAD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs of a model card; ``from_card`` is the one place it is derived."""

    name: str
    version: str
    sha256: str
    image_size: tuple[int, int]
    threshold: float
    score_min: float
    score_max: float

    def __post_init__(self) -> None:
        """Refuse values that break every inference (NaN never alarms), as the card does."""
        for name in ("threshold", "score_min", "score_max"):
            value = getattr(self, name)
            problem = finite_problem(value)
            if problem is not None:
                raise field_error(name, value, problem)
        problem = image_size_problem(*self.image_size)
        if problem is not None:
            raise field_error("image_size", self.image_size, problem)

    @classmethod
    def from_card(cls, card: ModelCard) -> ModelInfo:
        return cls(
            name=card.name,
            version=card.version,
            sha256=card.weights_sha256,
            image_size=card.image_size,
            threshold=card.threshold,
            score_min=card.score_min,
            score_max=card.score_max,
        )


@dataclass
class BatchPrediction:
    scores: np.ndarray  # float32 [B] raw EfficientAD score (max of the quantile-normalised map)
    normalized: np.ndarray  # float32 [B] in [0, 1]; 0.5 is the threshold
    anomalous: np.ndarray  # bool [B]
    maps: np.ndarray  # float32 [B, H, W] at model input size, same units as scores


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def normalize_scores(scores: np.ndarray, info: ModelInfo) -> np.ndarray:
    """anomalib's convention: 0.5 at the threshold, scaled by the validation score range."""
    span = max(info.score_max - info.score_min, 1e-12)
    return np.clip((scores - info.threshold) / span + 0.5, 0.0, 1.0).astype(np.float32)


class InferenceEngine:
    def __init__(
        self, model: EfficientAD, info: ModelInfo, device: str = "auto", half: bool = False
    ) -> None:
        self.device = resolve_device(device)
        if half and self.device.type != "cuda":
            log.warning(
                "fp16 inference requested on %s; using fp32 (fp16 is for GPUs)", self.device
            )
            half = False
        self.dtype = torch.float16 if half else torch.float32
        if not model.mean_std.is_set:
            raise CheckpointError("model has no teacher channel statistics (mean_std unset)")
        self.info = info
        self.model = model.eval().to(self.device, self.dtype)
        self.model.requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", half: bool = False) -> InferenceEngine:
        model, card = load_checkpoint(Path(path))
        if not model.quantiles.is_set:
            raise CheckpointError(
                f"{path}: map quantiles are not set; the model was not calibrated"
            )
        return cls(model, ModelInfo.from_card(card), device, half)

    @classmethod
    def from_model(
        cls, model: EfficientAD, info: ModelInfo, device: str = "auto", half: bool = False
    ) -> InferenceEngine:
        return cls(model, info, device, half)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] RGB -> float [0,1] at the model size, resized as in training."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a [B,3,H,W] RGB batch, got shape {tuple(batch.shape)}")
        x = batch.to(self.device, non_blocking=True)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != self.info.image_size:
            x = F.interpolate(
                x, size=self.info.image_size, mode="bilinear", align_corners=False, antialias=True
            ).clamp_(0, 1)
        return x.to(self.dtype)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> BatchPrediction:
        out = self.model(self.prepare(batch))
        scores = out.score.float().cpu().numpy().astype(np.float32)
        maps = out.anomaly_map[:, 0].float().cpu().numpy().astype(np.float32)
        return BatchPrediction(
            scores=scores,
            normalized=normalize_scores(scores, self.info),
            anomalous=scores >= self.info.threshold,
            maps=maps,
        )

    def predict_images(self, images: list[np.ndarray]) -> BatchPrediction:
        """RGB uint8 HxWx3 images of any sizes (each is resized to the model size)."""
        tensors = []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: expected HxWx3 uint8 RGB, got {img.shape} {img.dtype}"
                )
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0)
            tensors.append(self.prepare(t))
        x = torch.cat(tensors)
        with torch.inference_mode():
            out = self.model(x)
        scores = out.score.float().cpu().numpy().astype(np.float32)
        return BatchPrediction(
            scores=scores,
            normalized=normalize_scores(scores, self.info),
            anomalous=scores >= self.info.threshold,
            maps=out.anomaly_map[:, 0].float().cpu().numpy().astype(np.float32),
        )
