"""Losses on hand-checkable tensors, and the quantile that survives more than 2^24 elements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.losses import (
    TORCH_QUANTILE_LIMIT,
    autoencoder_losses,
    hard_feature_loss,
    penalty_loss,
    robust_quantile,
)


def st_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher all 0; student ST head 0 except channels 0,1,2 = 3,2,1 (distances 9, 4, 1).

    The student's AE head (channels 384..767) is 100 and must never enter the ST losses.
    """
    teacher = torch.zeros(1, 384, 1, 1)
    student = torch.zeros(1, 768, 1, 1)
    student[0, 384:] = 100.0
    student[0, 0], student[0, 1], student[0, 2] = 3.0, 2.0, 1.0
    return teacher, student.requires_grad_(True)


def test_hard_loss_keeps_only_distances_at_or_above_the_quantile():
    teacher, student = st_pair()
    # 384 distances sorted: 381 zeros, 1, 4, 9. q=0.999: position 0.999*383 = 382.617 lies
    # between 4 (index 382) and 9 (index 383): d_hard = 4 + 0.617*5 = 7.085 -> only 9 is kept
    loss = hard_feature_loss(teacher, student, q=0.999)
    assert loss.item() == pytest.approx(9.0)
    loss.backward()
    grad = student.grad[0, :, 0, 0]
    assert grad[0].item() == pytest.approx(2 * 3.0)  # d/ds (s - t)^2 over one kept element
    assert torch.count_nonzero(grad) == 1  # unselected and AE-head elements get no gradient

    # q = 380.5/383: position 380.5 lies between 0 and 1: d_hard = 0.5 -> 1, 4, 9 are kept
    loss = hard_feature_loss(teacher, student.detach(), q=380.5 / 383)
    assert loss.item() == pytest.approx(14.0 / 3.0)
    # q = 0.5: d_hard = 0, every element is kept -> plain mean
    loss = hard_feature_loss(teacher, student.detach(), q=0.5)
    assert loss.item() == pytest.approx(14.0 / 384.0)


def test_penalty_is_the_mean_square_of_the_student_st_head():
    out = torch.full((2, 768, 3, 3), 100.0)
    out[:, :384] = 2.0
    out[1, :384] = -1.0
    assert penalty_loss(out).item() == pytest.approx((4.0 + 1.0) / 2)


def test_autoencoder_losses_values_and_gradients_reach_ae_and_student():
    teacher = torch.full((1, 384, 2, 2), 1.0)
    ae = torch.full((1, 384, 2, 2), 3.0, requires_grad=True)
    student = torch.full((1, 768, 2, 2), 50.0)
    student[:, 384:] = 0.5
    student.requires_grad_(True)

    loss_ae, loss_stae = autoencoder_losses(teacher, ae, student)
    assert loss_ae.item() == pytest.approx((3.0 - 1.0) ** 2)
    assert loss_stae.item() == pytest.approx((3.0 - 0.5) ** 2)

    loss_stae.backward()
    n = 384 * 2 * 2
    assert ae.grad is not None and student.grad is not None
    assert torch.allclose(ae.grad, torch.full_like(ae, 2 * (3.0 - 0.5) / n))
    assert torch.allclose(student.grad[:, 384:], torch.full_like(ae, -2 * (3.0 - 0.5) / n))
    assert torch.count_nonzero(student.grad[:, :384]) == 0


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_robust_quantile_equals_torch_quantile_on_small_inputs(q, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert robust_quantile(x, q).item() == pytest.approx(torch.quantile(x, q).item(), abs=1e-6)


def test_robust_quantile_keeps_shape_independent_and_refuses_empty():
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))
    assert robust_quantile(x, 0.9).item() == pytest.approx(torch.quantile(x.flatten(), 0.9).item())
    with pytest.raises(ValueError, match="empty"):
        robust_quantile(torch.zeros(0), 0.5)


@pytest.fixture(scope="module")
def big() -> np.ndarray:
    """> 2^24 float32 values (~67 MB): more than torch.quantile accepts before torch 2.14."""
    n = TORCH_QUANTILE_LIMIT + 1001
    return np.random.default_rng(0).standard_normal(n, dtype=np.float32)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.999])
def test_robust_quantile_is_exact_above_2_pow_24(big, q):
    expected = np.quantile(big.astype(np.float64), q)  # linear interpolation, like torch
    got = robust_quantile(torch.from_numpy(big), q).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_hard_loss_works_on_more_than_2_pow_24_distances():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, 384, 210, 210, generator=gen)  # 16.9 M elements > 2^24
    student = torch.randn(1, 768, 210, 210, generator=gen)
    distance = ((teacher - student[:, :384]) ** 2).numpy().astype(np.float64).ravel()
    d_hard = np.quantile(distance, 0.999)
    expected = distance[distance >= d_hard].mean()
    assert hard_feature_loss(teacher, student).item() == pytest.approx(expected, rel=1e-5)
