"""Build the git-ignored inputs the device scripts read, from ../shared, small enough to carry.

The device tool copies at most 64 MiB of ignored paths per call, so images are re-encoded:
    .gpu/imagenet/                    distillation images, JPEG q85, long side <= 512
    .gpu/mobilenet_v2_fp16.safetensors backbone weights cast to fp16 (hash of the source recorded)
    .gpu2/data/<dataset>/             the four MVTec-layout datasets resized to 256x256 (PNG masks)
    .gpu2/penalty/                    the penalty images, JPEG q85, long side <= 512
Usage: python scripts/prepare_device_inputs.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import cv2
import torch
from safetensors.torch import save_file

DATASETS = ("hazelnut_toy", "battery_weld", "cookies", "mpdd_metal_plate")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def reencode(src: Path, dst: Path, long_side: int) -> None:
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"unreadable image {src}")
    h, w = img.shape[:2]
    scale = min(1.0, long_side / max(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst.with_suffix(".jpg")), img, [cv2.IMWRITE_JPEG_QUALITY, 85])


def resize_dataset(src: Path, dst: Path, size: int = 256) -> None:
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
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=Path("../shared"))
    p.add_argument("--penalty-every", type=int, default=3, help="keep every Nth image as penalty")
    args = p.parse_args()
    shared = args.shared
    for folder in (Path(".gpu"), Path(".gpu2")):
        shutil.rmtree(folder, ignore_errors=True)
    sample = sorted(
        q
        for q in (shared / "data" / "imagenet_sample").rglob("*")
        if q.suffix.lower() in IMAGE_SUFFIXES
    )
    for i, src in enumerate(sample):
        reencode(src, Path(".gpu/imagenet") / src.name, 512)
        if i % args.penalty_every == 0:
            reencode(src, Path(".gpu2/penalty") / src.name, 512)
    weights = shared / "weights" / "mobilenet_v2-b0353104.pth"
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        ".gpu/mobilenet_v2_fp16.safetensors",
        metadata={"source": weights.name, "source_sha256": digest},
    )
    for name in DATASETS:
        resize_dataset(shared / "data" / name, Path(".gpu2/data") / name)
    for folder in (Path(".gpu"), Path(".gpu2")):
        total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
