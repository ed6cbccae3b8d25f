"""EfficientAD training with the paper's recipe (batch 1, hard loss, penalty, AE augmentation).

After training: teacher statistics come from the training images, map quantiles from a held-out
split of NORMAL training images (never the test set), and the image threshold from labelled
validation data when given, else from the normal validation scores (see ``pick_threshold``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from tqdm import tqdm

from models.checkpoint import save_checkpoint
from models.data import (
    AnomalyDataset,
    DataError,
    Sample,
    discover_dataset,
    list_images,
    load_rgb,
    split_train_validation,
    to_tensor,
)
from models.inference import resolve_device
from models.losses import autoencoder_losses, hard_feature_loss, penalty_loss, robust_quantile
from models.model_card import DEFAULT_IMAGE_SIZE, ModelCard, TeacherProvenance, check_image_size
from models.networks import EfficientAD, ModelSize
from models.teacher import resolve_teacher
from models.training_state import has_training_state, load_training_state, save_training_state
from models.version import __version__

log = logging.getLogger(__name__)

QUANTILE_A = 0.9
QUANTILE_B = 0.995
NORMAL_THRESHOLD_QUANTILE = 0.995


@dataclass
class TrainConfig:
    data: Path
    out: Path
    model_size: ModelSize = "s"
    steps: int = 70_000
    teacher: str = "auto"
    penalty_images: Path | None = None
    seed: int = 42
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    lr: float = 1e-4
    weight_decay: float = 1e-5
    hard_quantile: float = 0.999
    validation_fraction: float = 0.1
    threshold_data: Path | None = (
        None  # labelled validation set (good + defects) for an F1 threshold
    )
    threshold: float | None = None  # fixed threshold overrides both methods
    threshold_margin: float = 1.2
    padding: bool = False
    pad_maps: bool = True
    device: str = "auto"
    amp: bool = False  # bf16 autocast on CUDA
    checkpoint_every: int = 1000
    resume: bool = False
    progress: bool = True
    name: str | None = None
    max_penalty_images: int = 2000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _stack(samples: list[Sample], size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N,3,H,W] so thousands of images fit in memory."""
    return torch.stack([(to_tensor(load_rgb(s.path), size) * 255).round().byte() for s in samples])


def load_penalty_bank(folder: Path, size: tuple[int, int], limit: int, seed: int) -> torch.Tensor:
    """Penalty images as in the paper: resize to 2x, centre-crop to the input size (grey later)."""
    paths = list_images(Path(folder), recursive=True)
    if not paths:
        raise DataError(f"no penalty images under {folder}")
    if len(paths) > limit:
        paths = sorted(np.random.default_rng(seed).choice(paths, limit, replace=False).tolist())
    h, w = size
    out = []
    for path in paths:
        big = to_tensor(load_rgb(Path(path)), (2 * h, 2 * w))
        out.append((TF.center_crop(big, [h, w]) * 255).round().byte())
    return torch.stack(out)


def augment_ae(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One of brightness / contrast / saturation with a factor from U(0.8, 1.2)."""
    choice = int(torch.randint(3, (1,), generator=gen))
    factor = float(0.8 + 0.4 * torch.rand(1, generator=gen))
    fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[choice]
    return fn(x, factor)


@torch.no_grad()
def teacher_channel_stats(
    model: EfficientAD, images: torch.Tensor, device: torch.device, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the raw teacher output over all training images."""
    s1 = s2 = None
    count = 0
    for i in range(0, len(images), batch):
        y = model.teacher(images[i : i + batch].to(device).float() / 255).double()
        s1 = y.sum(dim=(0, 2, 3)) if s1 is None else s1 + y.sum(dim=(0, 2, 3))
        s2 = (y**2).sum(dim=(0, 2, 3)) if s2 is None else s2 + (y**2).sum(dim=(0, 2, 3))
        count += y.shape[0] * y.shape[2] * y.shape[3]
    assert s1 is not None and s2 is not None
    mean = s1 / count
    std = torch.sqrt(torch.clamp(s2 / count - mean**2, min=1e-12))
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


@torch.no_grad()
def fit_quantiles(
    model: EfficientAD, images: torch.Tensor, device: torch.device, batch: int = 8
) -> dict[str, float]:
    """q_a / q_b of the raw (unpadded) ST and AE maps over the normal validation images."""
    st, ae = [], []
    for i in range(0, len(images), batch):
        m_st, m_ae = model.raw_maps(images[i : i + batch].to(device).float() / 255)
        st.append(m_st.flatten().cpu())
        ae.append(m_ae.flatten().cpu())
    all_st, all_ae = torch.cat(st), torch.cat(ae)
    return {
        "qa_st": float(robust_quantile(all_st, QUANTILE_A)),
        "qb_st": float(robust_quantile(all_st, QUANTILE_B)),
        "qa_ae": float(robust_quantile(all_ae, QUANTILE_A)),
        "qb_ae": float(robust_quantile(all_ae, QUANTILE_B)),
    }


@torch.no_grad()
def image_scores(
    model: EfficientAD, images: torch.Tensor, device: torch.device, batch: int = 8
) -> np.ndarray:
    out = [
        model(images[i : i + batch].to(device).float() / 255).score.cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def pick_threshold(
    normal_scores: np.ndarray,
    labelled: tuple[np.ndarray, np.ndarray] | None,
    margin: float,
) -> tuple[float, str]:
    """F1-optimal on labelled data; otherwise margin x the 99.5th percentile of normal scores."""
    if labelled is not None and len(set(labelled[1].tolist())) == 2:
        from models.metrics import best_f1

        f1, thr = best_f1(labelled[0], labelled[1])
        return float(thr), f"f1_optimal(f1={f1:.4f}, n={len(labelled[0])})"
    if len(normal_scores) == 0:
        raise DataError("no normal validation images to pick a threshold from")
    q = float(np.quantile(normal_scores, NORMAL_THRESHOLD_QUANTILE))
    return q * margin if q > 0 else q + 0.1 * margin, (
        f"normal_quantile(q={NORMAL_THRESHOLD_QUANTILE}, margin={margin}, n={len(normal_scores)})"
    )


def _load_labelled(root: Path, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    ds = discover_dataset(root)
    if not ds.test:
        raise DataError(f"threshold data {root} has no test images")
    return _stack(ds.test, size), np.array([s.label for s in ds.test])


def train(cfg: TrainConfig) -> Path:
    """Train, calibrate and save a model directory; returns its path."""
    t_start = time.time()
    height, width = check_image_size(*cfg.image_size)
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)

    dataset: AnomalyDataset = discover_dataset(cfg.data)
    if not dataset.train:
        raise DataError(f"{cfg.data}: no normal training images")
    train_samples, val_samples = split_train_validation(
        dataset.train, cfg.validation_fraction, cfg.seed
    )
    if not val_samples:
        log.warning(
            "only %d training image(s): quantiles are fitted on training images", len(train_samples)
        )
        val_samples = train_samples
    train_images = _stack(train_samples, cfg.image_size)
    val_images = _stack(val_samples, cfg.image_size)
    penalty = (
        load_penalty_bank(cfg.penalty_images, cfg.image_size, cfg.max_penalty_images, cfg.seed)
        if cfg.penalty_images
        else None
    )
    if penalty is None:
        log.warning("no --penalty-images: training without the paper's ImageNet penalty loss")

    teacher, teacher_info = resolve_teacher(cfg.teacher, cfg.model_size)
    model = EfficientAD(cfg.model_size, padding=cfg.padding, pad_maps=cfg.pad_maps)
    model.teacher.load_state_dict(teacher.state_dict())
    model.to(device)
    mean, std = teacher_channel_stats(model, train_images, device)
    model.mean_std.mean.copy_(mean)
    model.mean_std.std.copy_(std)

    params = list(model.student.parameters()) + list(model.ae.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, int(0.95 * cfg.steps)), gamma=0.1
    )
    work = Path(cfg.out) / "train_state"
    modules = {"student": model.student, "ae": model.ae}
    # the global generator drives dropout; saving it makes a resumed run repeat an unbroken one
    generators = {"gen": gen, "torch": torch.default_generator}
    step = 0
    if cfg.resume and has_training_state(work):
        step, _ = load_training_state(work, modules, optimizer, generators)
        scheduler.last_epoch = step  # the optimizer state already holds the (decayed) lr
        log.info("resumed training at step %d", step)
    elif cfg.resume:
        log.warning("--resume: no training state in %s; starting from step 0", work)

    model.train()
    autocast = cfg.amp and device.type == "cuda"
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    running: dict[str, float] = {}
    t_loop = time.time()
    start_step = step
    while step < cfg.steps:
        idx = int(torch.randint(len(train_images), (1,), generator=gen))
        img = train_images[idx : idx + 1].to(device).float() / 255
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            t = model.teacher_features(img)
            s = model.student(img)
            loss_hard = hard_feature_loss(t.float(), s.float(), cfg.hard_quantile)
            loss_st = loss_hard
            loss_pen = torch.zeros((), device=device)
            if penalty is not None:
                p_idx = int(torch.randint(len(penalty), (1,), generator=gen))
                pen = penalty[p_idx : p_idx + 1].to(device).float() / 255
                if float(torch.rand(1, generator=gen)) < 0.3:
                    pen = TF.rgb_to_grayscale(pen, num_output_channels=3)
                loss_pen = penalty_loss(model.student(pen).float())
                loss_st = loss_hard + loss_pen
            aug = augment_ae(img, gen)
            a = model.ae(aug)
            t_aug = model.teacher_features(aug)
            s_aug = model.student(aug)
            loss_ae, loss_stae = autoencoder_losses(t_aug.float(), a.float(), s_aug.float())
            loss = loss_st + loss_ae + loss_stae
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if step % 10 == 0 or step == cfg.steps:
            values = {
                "loss": loss,
                "hard": loss_hard,
                "pen": loss_pen,
                "ae": loss_ae,
                "stae": loss_stae,
            }
            for key, val in values.items():
                v = float(val.detach()) if torch.is_tensor(val) else float(val)
                running[key] = 0.9 * running.get(key, v) + 0.1 * v
            bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()})
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_training_state(work, modules, optimizer, step, {}, generators)
    bar.close()
    # kept so `--resume --steps MORE` can extend a finished run; inference never reads it
    save_training_state(work, modules, optimizer, step, {}, generators)
    train_seconds = time.time() - t_loop
    if not all(math.isfinite(v) for v in running.values()):
        raise FloatingPointError(f"training diverged: losses {running}")

    model.eval()
    q = fit_quantiles(model, val_images, device)
    for key, value in q.items():
        getattr(model.quantiles, key).fill_(value)
    normal_scores = image_scores(model, val_images, device)
    labelled = None
    if cfg.threshold_data is not None:
        imgs, labels = _load_labelled(cfg.threshold_data, cfg.image_size)
        labelled = (image_scores(model, imgs, device), labels)
    if cfg.threshold is not None:
        threshold, method = float(cfg.threshold), "fixed"
    else:
        threshold, method = pick_threshold(normal_scores, labelled, cfg.threshold_margin)
    all_scores = np.concatenate([normal_scores] + ([labelled[0]] if labelled else []))
    score_min = float(all_scores.min())
    score_max = float(max(all_scores.max(), 2 * threshold - score_min))

    card = ModelCard.create(
        name=cfg.name or Path(cfg.out).name,
        version=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        model_size=model.size,
        padding=model.padding,
        pad_maps=model.pad_maps,
        image_size=(height, width),
        threshold=threshold,
        threshold_method=method,
        score_min=score_min,
        score_max=score_max,
        quantiles=q,
        validation={
            "normal_images": len(val_samples),
            "normal_scores": [round(float(v), 6) for v in normal_scores],
        },
        teacher=TeacherProvenance(
            source=teacher_info.source,
            location=teacher_info.location,
            sha256=teacher_info.sha256,
            **teacher_info.details,
        ),
        dataset={
            "root": str(cfg.data),
            "layout": dataset.layout,
            "name": dataset.name,
            "fingerprint": dataset.fingerprint(),
            "train_images": len(train_samples),
        },
        training={
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "steps": step,
            "final_losses": running,
            "seconds": round(train_seconds, 1),
            "steps_per_second": round((step - start_step) / max(train_seconds, 1e-9), 3),
            "device": str(device),
            "penalty_images": 0 if penalty is None else len(penalty),
            "torch": torch.__version__,
        },
        package_version=__version__,
        total_seconds=round(time.time() - t_start, 1),
    )
    out = save_checkpoint(model.cpu(), card, Path(cfg.out))
    log.info("saved %s (threshold %.4f by %s)", out, threshold, method)
    return out
