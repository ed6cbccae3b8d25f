"""ImageNet backbones used as distillation targets, each with feature taps at strides 8 and 16.

The paper distils WideResNet-101 layer2 + layer3 (PatchCore's feature space). Other torchvision
backbones are offered for machines or domains where that is too heavy; each lists the node whose
output has stride 8 and the one with stride 16.

MobileNetV2 is tapped at the expanded (6x, ReLU6) activations that open the next stage, not at the
32/96-channel linear bottleneck outputs of features.6 / features.13: on the four ../shared datasets
a nearest-neighbour probe on the distillation target scored mean image AUROC 0.944 with the
expanded taps vs 0.879 with the bottlenecks at a 10k-patch bank, 0.949 vs 0.943 at 30k
(README, "Teacher").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from models.checkpoint import read_safetensors, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    stride8: str  # torchvision graph node with stride-8 output
    stride16: str  # node with stride-16 output
    channels: tuple[int, int]
    weights_enum: str  # torchvision weights enum name used when online


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "wide_resnet101_2", "layer2", "layer3", (512, 1024), "Wide_ResNet101_2_Weights"
        ),
        BackboneSpec("wide_resnet50_2", "layer2", "layer3", (512, 1024), "Wide_ResNet50_2_Weights"),
        BackboneSpec("resnet50", "layer2", "layer3", (512, 1024), "ResNet50_Weights"),
        BackboneSpec("resnet18", "layer2", "layer3", (128, 256), "ResNet18_Weights"),
        BackboneSpec(
            "mobilenet_v2",
            "features.7.conv.0",
            "features.14.conv.0",
            (192, 576),
            "MobileNet_V2_Weights",
        ),
    )
}


class BackboneError(ValueError):
    pass


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}"
        ) from None


def _load_weights_file(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        state = read_safetensors(path, BackboneError)
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model_state = model.state_dict()
    state = {k: v.to(model_state[k].dtype) if k in model_state else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=True)
    del result


class FeatureTaps(nn.Module):
    """Backbone returning its stride-8 and stride-16 features for [0,1] RGB input."""

    def __init__(self, spec: BackboneSpec, model: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.body = create_feature_extractor(model, {spec.stride8: "s8", spec.stride16: "s16"})
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return out["s8"], out["s16"]


def load_backbone(name: str, weights_file: Path | None = None) -> tuple[FeatureTaps, str]:
    """Backbone in eval mode plus a provenance string (weights file sha256 or torchvision enum).

    Without a weights file torchvision downloads the ImageNet weights (needs a network).
    """
    spec = get_spec(name)
    builder = getattr(torchvision.models, name)
    if weights_file is not None:
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            raise BackboneError(f"backbone weights file not found: {weights_file}")
        model = builder(weights=None)
        _load_weights_file(model, weights_file)
        provenance = f"file:{weights_file.name} sha256:{sha256_file(weights_file)}"
    else:
        enum = getattr(torchvision.models, spec.weights_enum).IMAGENET1K_V1
        log.info("downloading %s ImageNet weights through torchvision (%s)", name, enum)
        model = builder(weights=enum)
        provenance = f"torchvision:{spec.weights_enum}.IMAGENET1K_V1"
    taps = FeatureTaps(spec, model).eval()
    taps.requires_grad_(False)
    return taps, provenance
