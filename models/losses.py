"""EfficientAD losses and a quantile that works past torch.quantile's 2^24-element limit."""

from __future__ import annotations

import math

import torch

from models.networks import TEACHER_CHANNELS

TORCH_QUANTILE_LIMIT = 1 << 24


def robust_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation on any number of elements (exact, via kthvalue)."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if n <= TORCH_QUANTILE_LIMIT:
        return torch.quantile(flat.float(), q).to(flat.dtype)
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = torch.kthvalue(flat, lo + 1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(flat, hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def hard_feature_loss(
    teacher: torch.Tensor, student: torch.Tensor, q: float = 0.999
) -> torch.Tensor:
    """Mean of the squared ST differences at or above their q-quantile (the paper's L_hard)."""
    distance = (teacher - student[:, :TEACHER_CHANNELS]) ** 2
    d_hard = robust_quantile(distance.detach(), q)
    return torch.mean(distance[distance >= d_hard])


def penalty_loss(student_on_penalty: torch.Tensor) -> torch.Tensor:
    """Keeps the student from imitating the teacher outside the normal images' distribution."""
    return torch.mean(student_on_penalty[:, :TEACHER_CHANNELS] ** 2)


def autoencoder_losses(
    teacher_aug: torch.Tensor, ae_aug: torch.Tensor, student_aug: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_AE, L_STAE); L_STAE's gradient reaches both AE and student, as in the reference code."""
    loss_ae = torch.mean((teacher_aug - ae_aug) ** 2)
    loss_stae = torch.mean((ae_aug - student_aug[:, TEACHER_CHANNELS:]) ** 2)
    return loss_ae, loss_stae
