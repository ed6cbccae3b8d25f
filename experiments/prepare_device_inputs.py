"""Shrink the inputs of the device experiments so one call of a GPU machine can carry them.

A lent GPU machine receives at most 64 MiB of files per call, so this re-encodes, on the dev box:

    OUT/distill/imagenet/                   distillation images, JPEG q85, long side <= 512
    OUT/distill/backbone_fp16.safetensors   backbone weights cast to fp16 (source hash recorded)
    OUT/comparison/data/<dataset>/          MVTec-layout datasets resized to SIZE (PNG masks)
    OUT/comparison/penalty/                 every Nth ImageNet image as penalty, JPEG q85

Usage (see experiments/README.md):
    python experiments/prepare_device_inputs.py --imagenet DIR --backbone-weights FILE \\
        --datasets DIR [DIR ...] --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import cv2
import torch
from safetensors.torch import save_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def reencode(src: Path, dst: Path, long_side: int) -> None:
    """``src`` as a JPEG (q85) at ``dst``, shrunk to ``long_side`` when larger."""
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"unreadable image {src}")
    h, w = img.shape[:2]
    scale = min(1.0, long_side / max(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst.with_suffix(".jpg")), img, [cv2.IMWRITE_JPEG_QUALITY, 85])


def resize_dataset(src: Path, dst: Path, size: int) -> None:
    """An MVTec-layout dataset at ``size`` x ``size`` (masks with nearest neighbour), as PNG."""
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        is_mask = "ground_truth" in path.parts
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if is_mask else cv2.IMREAD_COLOR)
        interp = cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(out.with_suffix(".png")), cv2.resize(img, (size, size), interpolation=interp)
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imagenet", type=Path, required=True, help="ImageNet-like image folder")
    p.add_argument(
        "--backbone-weights", type=Path, required=True, help="torchvision state dict (.pth)"
    )
    p.add_argument(
        "--datasets", type=Path, nargs="+", required=True, help="MVTec-layout dataset folders"
    )
    p.add_argument("--out", type=Path, required=True, help="where distill/ and comparison/ go")
    p.add_argument("--size", type=int, default=256, help="side the datasets are resized to")
    p.add_argument("--penalty-every", type=int, default=3, help="keep every Nth image as penalty")
    args = p.parse_args()
    distill, comparison = args.out / "distill", args.out / "comparison"
    for folder in (distill, comparison):
        shutil.rmtree(folder, ignore_errors=True)
    sample = sorted(q for q in args.imagenet.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
    for i, src in enumerate(sample):
        reencode(src, distill / "imagenet" / src.name, 512)
        if i % args.penalty_every == 0:
            reencode(src, comparison / "penalty" / src.name, 512)
    state = torch.load(str(args.backbone_weights), map_location="cpu", weights_only=True)
    digest = hashlib.sha256(args.backbone_weights.read_bytes()).hexdigest()
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        str(distill / "backbone_fp16.safetensors"),
        metadata={"source": args.backbone_weights.name, "source_sha256": digest},
    )
    for dataset in args.datasets:
        resize_dataset(dataset, comparison / "data" / dataset.name, args.size)
    for folder in (distill, comparison):
        total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
