"""Teacher pretraining: distil an ImageNet backbone's patch features into a PDN.

Follows the paper / nelson1425's ``pretraining.py``: stride-8 and stride-16 backbone features are
aggregated over 3x3 neighbourhoods (PatchCore), the stride-16 map is upsampled to the stride-8 grid,
each layer's flattened patch vector is average-pooled to 1024 values, the two are stacked and pooled
to 384 channels, and the target is normalised per channel. The PDN (padding on, 64x64 output for a
256 px input) regresses that target for the same crop seen at 512 px by the backbone; MSE loss, Adam
1e-4 / wd 1e-5, grayscale with p=0.1. Random resized crops and flips let a small image set go
further.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from tqdm import tqdm

from models.backbones import FeatureTaps, get_spec, load_backbone
from models.checkpoint import save_teacher, sha256_file
from models.inference import resolve_device
from models.networks import TEACHER_CHANNELS, ModelSize, build_pdn
from models.training_state import has_training_state, load_training_state, save_training_state

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class DistillError(ValueError):
    pass


@dataclass
class DistillConfig:
    images: Path
    out: Path
    backbone: str = "wide_resnet101_2"
    backbone_weights: Path | None = None
    size: ModelSize = "s"
    steps: int = 60_000
    batch: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-5
    grayscale_p: float = 0.1
    stat_samples: int = 10_000
    backbone_input: int = 512
    pdn_input: int = 256
    min_crop_scale: float = 0.25
    max_side: int = 512
    seed: int = 42
    device: str = "auto"
    checkpoint_every: int = 500
    resume: bool = False
    out_dtype: str = "fp32"  # fp32 | fp16 for the shipped file
    max_seconds: float | None = None  # wall-clock budget; stops early and saves
    work_dir: Path | None = None  # resume state; default OUT.work/
    init: Path | None = None  # warm start: an existing teacher file of the same size
    extra_meta: dict = field(default_factory=dict)


def find_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DistillError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DistillError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    return paths


class ImageBank:
    """All images decoded once into one padded uint8 tensor; crops are taken with roi_align."""

    def __init__(self, paths: list[Path], max_side: int, device: torch.device) -> None:
        arrays, sizes = [], []
        for path in paths:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                log.warning("skipping unreadable image %s", path)
                continue
            h, w = img.shape[:2]
            scale = min(1.0, max_side / max(h, w))
            if scale < 1.0:
                img = cv2.resize(
                    img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
                )
            arrays.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            sizes.append(img.shape[:2])
        if not arrays:
            raise DistillError("none of the images could be read")
        side = max(max(s) for s in sizes)
        bank = np.zeros((len(arrays), side, side, 3), dtype=np.uint8)
        for i, arr in enumerate(arrays):
            bank[i, : arr.shape[0], : arr.shape[1]] = arr
        self.images = torch.from_numpy(bank).permute(0, 3, 1, 2).contiguous().to(device)
        self.sizes = torch.tensor(sizes, dtype=torch.float32, device=device)  # (h, w)
        self.device = device

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(
        self, batch: int, out_size: int, gen: torch.Generator, min_scale: float, grayscale_p: float
    ) -> torch.Tensor:
        """Random resized crops (area scale, aspect 3/4..4/3), flips, grayscale; float [0,1]."""
        dev = self.device
        idx = torch.randint(len(self), (batch,), generator=gen, device="cpu").to(dev)
        r = torch.rand(batch, 6, generator=gen, device="cpu").to(dev)
        hw = self.sizes[idx]
        area = hw[:, 0] * hw[:, 1] * (min_scale + (1 - min_scale) * r[:, 0])
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[:, 1]
        ratio = torch.exp(log_ratio)
        cw = torch.sqrt(area * ratio).clamp(max=hw[:, 1])
        ch = torch.sqrt(area / ratio).clamp(max=hw[:, 0])
        x0 = (hw[:, 1] - cw) * r[:, 2]
        y0 = (hw[:, 0] - ch) * r[:, 3]
        boxes = torch.stack(
            [torch.arange(batch, device=dev, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1
        )
        src = self.images[idx].float() / 255.0
        crops = roi_align(
            src, boxes, output_size=out_size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
        flip = r[:, 4] < 0.5
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        grey = (0.299 * crops[:, 0] + 0.587 * crops[:, 1] + 0.114 * crops[:, 2]).unsqueeze(1)
        to_grey = (r[:, 5] < grayscale_p).view(-1, 1, 1, 1)
        return torch.where(to_grey, grey.expand_as(crops), crops).clamp(0, 1)


class PatchTarget(nn.Module):
    """PatchCore-style aggregation of two backbone taps into 384 channels on the stride-8 grid."""

    def __init__(
        self, taps: FeatureTaps, out_channels: int = TEACHER_CHANNELS, layer_dim: int = 1024
    ) -> None:
        super().__init__()
        self.taps = taps
        self.out_channels = out_channels
        self.layer_dim = layer_dim

    @staticmethod
    def _patches(feat: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feat.shape
        return F.unfold(feat, kernel_size=3, padding=1).view(b, c * 9, h, w)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8, f16 = self.taps(x)
        p8 = self._patches(f8.float())
        b, _, h, w = p8.shape
        p16 = F.interpolate(self._patches(f16.float()), size=(h, w), mode="bilinear")
        pooled = [
            F.adaptive_avg_pool1d(p.permute(0, 2, 3, 1).reshape(b * h * w, 1, -1), self.layer_dim)
            for p in (p8, p16)
        ]
        stacked = torch.cat(pooled, dim=2)  # [N, 1, 2 * layer_dim]
        out = F.adaptive_avg_pool1d(stacked, self.out_channels).view(b, h, w, self.out_channels)
        return out.permute(0, 3, 1, 2).contiguous()


def warm_start(pdn: nn.Module, cfg: DistillConfig, provenance: str) -> dict:
    """Load cfg.init's weights into the PDN; returns its provenance for the new file's metadata.

    A distillation budget rarely fits one sitting (the paper's is 60k x 16); warm starts let
    budgets add up across machines and sessions. The parent's target statistics are reused when
    it distilled the same backbone weights, so the target does not shift under the network.
    """
    from models.teacher import SHIPPED, TeacherError, load_teacher_file

    path = Path(cfg.init)
    if str(cfg.init) == "shipped":
        if cfg.size not in SHIPPED:
            raise DistillError(f"--init shipped: no shipped PDN-{cfg.size.upper()} teacher")
        path = SHIPPED[cfg.size]
    try:
        parent, parent_meta = load_teacher_file(path, cfg.size)
    except TeacherError as exc:
        raise DistillError(f"--init: {exc}") from exc
    pdn.load_state_dict(parent.state_dict())
    spec = get_spec(cfg.backbone)
    same_target = (
        parent_meta.get("backbone") == cfg.backbone
        and parent_meta.get("backbone_weights") == provenance
        and parent_meta.get("taps") == [spec.stride8, spec.stride16]
    )
    if not same_target:
        log.warning(
            "--init %s was distilled from %s (%s), not %s (%s): its weights are only a "
            "starting point",
            path,
            parent_meta.get("backbone", "an unknown backbone"),
            parent_meta.get("backbone_weights", "unknown weights"),
            cfg.backbone,
            provenance,
        )
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "steps": parent_meta.get("total_steps", parent_meta.get("steps")),
        "same_target": same_target,
        "target_mean": parent_meta.get("target_mean") if same_target else None,
        "target_std": parent_meta.get("target_std") if same_target else None,
    }


@torch.no_grad()
def target_statistics(
    target: PatchTarget, bank: ImageBank, cfg: DistillConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the target over up to cfg.stat_samples augmented crops."""
    total = 0
    s1 = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=bank.device)
    s2 = torch.zeros_like(s1)
    n_samples = max(1, min(cfg.stat_samples, 10 * len(bank)))
    batch = max(1, min(cfg.batch * 2, 64))
    while total < n_samples:
        b = min(batch, n_samples - total)
        x = bank.sample(b, cfg.backbone_input, gen, cfg.min_crop_scale, cfg.grayscale_p)
        y = target(x).double()
        s1 += y.sum(dim=(0, 2, 3))
        s2 += (y**2).sum(dim=(0, 2, 3))
        total += b
        count_per_sample = y.shape[2] * y.shape[3]
    n = total * count_per_sample
    mean = s1 / n
    std = torch.sqrt(torch.clamp(s2 / n - mean**2, min=1e-12))
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def distill(cfg: DistillConfig) -> Path:
    """Run distillation; returns the teacher file path."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    work = Path(cfg.work_dir or Path(str(cfg.out) + ".work"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    paths = find_images(cfg.images)
    bank = ImageBank(paths, cfg.max_side, device)
    taps, provenance = load_backbone(cfg.backbone, cfg.backbone_weights)
    target = PatchTarget(taps.to(device)).eval()
    pdn = build_pdn(cfg.size, TEACHER_CHANNELS, padding=True).to(device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    step = 0
    stats = nn.Module()
    stats.register_buffer("mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1, device=device))
    stats.register_buffer("std", torch.ones(1, TEACHER_CHANNELS, 1, 1, device=device))
    history: list[float] = []
    parent: dict | None = None
    if cfg.resume and has_training_state(work):
        step, extra = load_training_state(
            work, {"pdn": pdn, "stats": stats}, optimizer, {"gen": gen}
        )
        history = list(extra.get("loss_history", []))
        parent = extra.get("init")
        log.info("resumed distillation from %s at step %d", work, step)
    else:
        if cfg.init is not None:
            parent = warm_start(pdn, cfg, provenance)
        if parent is not None and parent["target_mean"] is not None:
            stats.mean.copy_(torch.tensor(parent["target_mean"]).view_as(stats.mean))
            stats.std.copy_(torch.tensor(parent["target_std"]).view_as(stats.std))
            log.info("reusing the target statistics of %s", parent["path"])
        else:
            t0 = time.time()
            mean, std = target_statistics(target, bank, cfg, gen)
            stats.mean.copy_(mean)
            stats.std.copy_(std)
            log.info("target statistics over %d crops in %.1fs", cfg.stat_samples, time.time() - t0)

    start = time.time()
    losses: list[float] = []
    pdn.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step", dynamic_ncols=True)
    autocast = device.type == "cuda"
    while step < cfg.steps:
        x = bank.sample(cfg.batch, cfg.backbone_input, gen, cfg.min_crop_scale, cfg.grayscale_p)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            y = target(x)
        y = (y.float() - stats.mean) / stats.std
        small = F.interpolate(
            x, size=(cfg.pdn_input, cfg.pdn_input), mode="bilinear", antialias=True
        )
        pred = pdn(small)
        loss = F.mse_loss(pred, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item() if step % 10 == 0 or step == cfg.steps else float("nan"))
        if step % 10 == 0:
            recent = [v for v in losses[-200:] if not math.isnan(v)]
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
        bar.update(1)
        if step % 100 == 0:
            history.append(float(np.nanmean(losses[-100:])))
        out_of_time = cfg.max_seconds is not None and time.time() - start > cfg.max_seconds
        if step % cfg.checkpoint_every == 0 or out_of_time:
            save_training_state(
                work,
                {"pdn": pdn, "stats": stats},
                optimizer,
                step,
                {"loss_history": history, "init": parent},
                {"gen": gen},
            )
        if out_of_time:
            log.warning("time budget of %.0fs reached at step %d", cfg.max_seconds, step)
            break
    bar.close()
    final = [v for v in losses[-500:] if not math.isnan(v)]
    meta = {
        "kind": "teacher",
        "model_size": cfg.size,
        "out_channels": TEACHER_CHANNELS,
        "trained_with_padding": True,
        "backbone": cfg.backbone,
        "backbone_weights": provenance,
        "taps": [taps.spec.stride8, taps.spec.stride16],
        "images": str(cfg.images),
        "num_images": len(bank),
        "steps": step,
        "total_steps": step + ((parent or {}).get("steps") or 0),
        "init": {k: v for k, v in parent.items() if not k.startswith("target_")}
        if parent
        else None,
        "batch": cfg.batch,
        "final_loss": float(np.mean(final)) if final else None,
        "loss_history_per_100_steps": history,
        "seconds": round(time.time() - start, 1),
        "device": str(device),
        # lets a later --init continue against exactly this target (float32 values round-trip)
        "target_mean": stats.mean.flatten().cpu().tolist(),
        "target_std": stats.std.flatten().cpu().tolist(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        **cfg.extra_meta,
    }
    dtype = torch.float16 if cfg.out_dtype == "fp16" else None
    return save_teacher(pdn.cpu(), meta, Path(cfg.out), dtype=dtype)
