"""EfficientAD networks with anomalib-compatible state-dict names.

Parameter names (teacher.conv1.., student.conv1.., ae.encoder.enconvN, ae.decoder.deconvN,
mean_std.mean/std, quantiles.qa_st/qb_st/qa_ae/qb_ae) match anomalib's ``EfficientAdModel`` so
that its teacher files and trained models load as they are. The anomaly-map order (zero-pad raw
maps by 4, bilinear resize to the input size, then quantile-normalise and average) is anomalib's
too, so imported models give the same maps and scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.model_card import MIN_IMAGE_SIDE, check_image_size

ModelSize = Literal["s", "m"]
TEACHER_CHANNELS = 384
MAP_PADDING = 4  # half the 33 px receptive field divided by the total stride of 4

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise [0,1] RGB; constants follow the input dtype so fp16 stays fp16."""
    mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def check_input_size(height: int, width: int) -> None:
    """The network itself only needs the minimum (the card also caps the size it runs at)."""
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        check_image_size(height, width)  # raises, saying why


class PDNSmall(nn.Module):
    """Patch description network, small variant (teacher: 384 channels, student: 768)."""

    def __init__(self, out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> None:
        super().__init__()
        p = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 128, kernel_size=4, padding=3 * p)
        self.conv2 = nn.Conv2d(128, 256, kernel_size=4, padding=3 * p)
        self.conv3 = nn.Conv2d(256, 256, kernel_size=3, padding=1 * p)
        self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = imagenet_normalize(x)
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.conv4(x)


class PDNMedium(nn.Module):
    """Patch description network, medium variant."""

    def __init__(self, out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> None:
        super().__init__()
        p = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 256, kernel_size=4, padding=3 * p)
        self.conv2 = nn.Conv2d(256, 512, kernel_size=4, padding=3 * p)
        self.conv3 = nn.Conv2d(512, 512, kernel_size=1)
        self.conv4 = nn.Conv2d(512, 512, kernel_size=3, padding=1 * p)
        self.conv5 = nn.Conv2d(512, out_channels, kernel_size=4)
        self.conv6 = nn.Conv2d(out_channels, out_channels, kernel_size=1)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = imagenet_normalize(x)
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.relu(self.conv5(x))
        return self.conv6(x)


def build_pdn(size: ModelSize, out_channels: int, padding: bool = False) -> nn.Module:
    if size == "s":
        return PDNSmall(out_channels, padding)
    if size == "m":
        return PDNMedium(out_channels, padding)
    raise ValueError(f"model size must be 's' or 'm', got {size!r}")


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enconv1 = nn.Conv2d(3, 32, kernel_size=4, stride=2, padding=1)
        self.enconv2 = nn.Conv2d(32, 32, kernel_size=4, stride=2, padding=1)
        self.enconv3 = nn.Conv2d(32, 64, kernel_size=4, stride=2, padding=1)
        self.enconv4 = nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.enconv5 = nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.enconv6 = nn.Conv2d(64, 64, kernel_size=8, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.enconv1, self.enconv2, self.enconv3, self.enconv4, self.enconv5):
            x = F.relu(conv(x))
        return self.enconv6(x)


def decoder_sizes(height: int, width: int, padding: bool) -> list[tuple[int, int]]:
    """Bilinear target sizes of the decoder, derived from the input size (anomalib's formulas)."""
    last = 0 if padding else 2 * MAP_PADDING
    return [
        (height // 64 - 1, width // 64 - 1),
        (height // 32, width // 32),
        (height // 16 - 1, width // 16 - 1),
        (height // 8, width // 8),
        (height // 4 - 1, width // 4 - 1),
        (height // 2 - 1, width // 2 - 1),
        (math.ceil(height / 4) - last, math.ceil(width / 4) - last),
    ]


class Decoder(nn.Module):
    def __init__(self, out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> None:
        super().__init__()
        self.padding = padding
        self.deconv1 = nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2)
        self.deconv2 = nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2)
        self.deconv3 = nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2)
        self.deconv4 = nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2)
        self.deconv5 = nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2)
        self.deconv6 = nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2)
        self.deconv7 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.deconv8 = nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1)
        self.dropout = nn.Dropout(p=0.2)

    def forward(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        sizes = decoder_sizes(image_size[0], image_size[1], self.padding)
        convs = (self.deconv1, self.deconv2, self.deconv3, self.deconv4, self.deconv5, self.deconv6)
        for conv, size in zip(convs, sizes[:6], strict=True):
            x = F.interpolate(x, size=size, mode="bilinear")
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=sizes[6], mode="bilinear")
        x = F.relu(self.deconv7(x))
        return self.deconv8(x)


class AutoEncoder(nn.Module):
    def __init__(self, out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(out_channels, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image_size = (x.shape[-2], x.shape[-1])
        return self.decoder(self.encoder(imagenet_normalize(x)), image_size)


class TeacherStats(nn.Module):
    """Per-channel mean/std of the teacher's output; zeros mean 'not fitted'."""

    def __init__(self, channels: int = TEACHER_CHANNELS) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.zeros(1, channels, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    @property
    def is_set(self) -> bool:
        return bool(torch.any(self.std != 0))


class MapQuantiles(nn.Module):
    """q_a (0.9) and q_b (0.995) of the ST and AE maps on normal validation images."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("qa_st", "qb_st", "qa_ae", "qb_ae"):
            self.register_buffer(name, torch.tensor(0.0))

    qa_st: torch.Tensor
    qb_st: torch.Tensor
    qa_ae: torch.Tensor
    qb_ae: torch.Tensor

    @property
    def is_set(self) -> bool:
        return bool(self.qb_st != self.qa_st) and bool(self.qb_ae != self.qa_ae)


@dataclass
class AnomalyOutput:
    """Inference result: per-image score (max of the map) and the map at input resolution."""

    score: torch.Tensor  # [B]
    anomaly_map: torch.Tensor  # [B, 1, H, W]
    map_st: torch.Tensor  # [B, 1, H, W], normalised if quantiles are set
    map_ae: torch.Tensor


class EfficientAD(nn.Module):
    """Teacher, student and autoencoder plus the statistics inference needs."""

    def __init__(self, size: ModelSize = "s", padding: bool = False, pad_maps: bool = True) -> None:
        super().__init__()
        self.size = size
        self.padding = padding
        self.pad_maps = pad_maps
        self.teacher = build_pdn(size, TEACHER_CHANNELS, padding)
        self.student = build_pdn(size, 2 * TEACHER_CHANNELS, padding)
        self.ae = AutoEncoder(TEACHER_CHANNELS, padding)
        self.mean_std = TeacherStats()
        self.quantiles = MapQuantiles()
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientAD:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
            if self.mean_std.is_set:
                t = (t - self.mean_std.mean.to(t.dtype)) / self.mean_std.std.to(t.dtype)
        return t

    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised M_ST and M_AE at the network's output resolution (56x56 for 256 px)."""
        check_input_size(x.shape[-2], x.shape[-1])
        t = self.teacher_features(x)
        s = self.student(x)
        a = self.ae(x)
        map_st = torch.mean((t - s[:, :TEACHER_CHANNELS]) ** 2, dim=1, keepdim=True)
        map_ae = torch.mean((a - s[:, TEACHER_CHANNELS:]) ** 2, dim=1, keepdim=True)
        return map_st, map_ae

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        image_size = (x.shape[-2], x.shape[-1])
        map_st, map_ae = self.raw_maps(x)
        if self.pad_maps:
            pad = (MAP_PADDING,) * 4
            map_st, map_ae = F.pad(map_st, pad), F.pad(map_ae, pad)
        map_st = F.interpolate(map_st, size=image_size, mode="bilinear")
        map_ae = F.interpolate(map_ae, size=image_size, mode="bilinear")
        if self.quantiles.is_set:
            q = self.quantiles
            map_st = 0.1 * (map_st - q.qa_st) / (q.qb_st - q.qa_st)
            map_ae = 0.1 * (map_ae - q.qa_ae) / (q.qb_ae - q.qa_ae)
        combined = 0.5 * map_st + 0.5 * map_ae
        score = torch.amax(combined, dim=(-2, -1)).flatten()
        return AnomalyOutput(score=score, anomaly_map=combined, map_st=map_st, map_ae=map_ae)


def neutral_model(size: ModelSize = "s", seed: int = 0) -> EfficientAD:
    """Random weights with neutral statistics (mean 0, std 1, quantiles 0 -> 1), in eval mode.

    The whole scoring path runs and costs what a trained model's does, but the scores mean
    nothing: for timing (``bench model``) and for tests that need a model, not a good one.
    """
    torch.manual_seed(seed)
    model = EfficientAD(size)
    with torch.no_grad():
        model.mean_std.mean.zero_()
        model.mean_std.std.fill_(1.0)
        for name, value in (("qa_st", 0.0), ("qb_st", 1.0), ("qa_ae", 0.0), ("qb_ae", 1.0)):
            getattr(model.quantiles, name).fill_(value)
    return model.eval()
