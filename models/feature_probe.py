"""Teacher quality probe: nearest-neighbour anomaly detection on frozen features (no training).

A teacher can only be as useful as its feature space is discriminative, and judging that through
EfficientAD itself needs a full student/AE training per dataset (hours on a CPU). A PatchCore-style
probe answers in minutes: keep a memory bank of patch features of the normal training images,
score each test patch by its distance to the nearest bank entry, and take the image maximum. It
compares teachers (or a backbone's distillation target before paying for the distillation) on the
user's own data; the numbers are a ranking signal, not EfficientAD's accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.data import AnomalyDataset, load_batch
from models.metrics import image_auroc
from models.model_card import DEFAULT_IMAGE_SIZE
from models.networks import ModelSize

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # [B,3,H,W] in [0,1] -> [B,C,h,w]


@dataclass(frozen=True)
class ProbeSettings:
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    bank_size: int = 30_000  # normal patches kept (random subset) in the memory bank
    batch: int = 8
    seed: int = 0  # of the bank subset


@dataclass(frozen=True)
class ProbeResult:
    dataset: str
    image_auroc: float
    train_images: int
    test_images: int
    bank_size: int
    feature_channels: int


def teacher_features(source: str | Path, size: ModelSize) -> FeatureFn:
    """A teacher as `train --teacher` resolves it; a random one is seeded so runs repeat."""
    from models.teacher import resolve_teacher

    if str(source) == "random":
        torch.manual_seed(0)
    pdn, _ = resolve_teacher(source, size)
    pdn.eval()
    return pdn


def target_features(backbone: str, weights: Path | None, scale: float = 2.0) -> FeatureFn:
    """The distillation target of BACKBONE (what a teacher distilled from it would imitate).

    Distillation shows the backbone the crop at twice the PDN's input size, so the probe does too.
    """
    from models.backbones import load_backbone
    from models.distill import PatchTarget

    taps, _ = load_backbone(backbone, weights)
    target = PatchTarget(taps).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        return target(F.interpolate(x, size=size, mode="bilinear", antialias=True))

    return features


def _patches(features: FeatureFn, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    f = features(x).float()
    b, c = f.shape[:2]
    return f.permute(0, 2, 3, 1).reshape(b, -1, c), c


@torch.no_grad()
def knn_scores(
    features: FeatureFn, dataset: AnomalyDataset, settings: ProbeSettings = ProbeSettings()
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per test image: max over its patches of the distance to the nearest normal patch.

    Returns (scores, labels, bank size, feature channels).
    """
    image_size, batch = settings.image_size, settings.batch
    bank_parts = []
    channels = 0
    for i in range(0, len(dataset.train), batch):
        patches, channels = _patches(features, load_batch(dataset.train[i : i + batch], image_size))
        bank_parts.append(patches.reshape(-1, channels))
    bank = torch.cat(bank_parts)
    if len(bank) > settings.bank_size:
        gen = torch.Generator().manual_seed(settings.seed)
        bank = bank[torch.randperm(len(bank), generator=gen)[: settings.bank_size]]
    bank_sq = (bank**2).sum(1)
    scores: list[float] = []
    labels: list[int] = []
    for i in range(0, len(dataset.test), batch):
        samples = dataset.test[i : i + batch]
        patches, _ = _patches(features, load_batch(samples, image_size))
        for image_patches in patches:
            best = torch.full((len(image_patches),), float("inf"))
            for j in range(0, len(bank), 8192):  # squared distances without a B x N x C tensor
                part = bank[j : j + 8192]
                d = (image_patches**2).sum(1, keepdim=True) - 2 * image_patches @ part.T
                best = torch.minimum(best, (d + bank_sq[j : j + 8192]).amin(1))
            scores.append(float(best.clamp(min=0).max().sqrt()))
        labels.extend(s.label for s in samples)
    return np.asarray(scores), np.asarray(labels), len(bank), channels


def knn_probe(
    features: FeatureFn, dataset: AnomalyDataset, settings: ProbeSettings = ProbeSettings()
) -> ProbeResult:
    """Image AUROC of the nearest-neighbour scores of ``knn_scores``."""
    if len({s.label for s in dataset.test}) < 2:
        raise ValueError(f"{dataset.root}: the probe needs normal and defective test images")
    scores, labels, kept, channels = knn_scores(features, dataset, settings)
    return ProbeResult(
        dataset=dataset.name,
        image_auroc=image_auroc(scores, labels),
        train_images=len(dataset.train),
        test_images=len(dataset.test),
        bank_size=kept,
        feature_channels=channels,
    )
