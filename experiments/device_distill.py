"""One-shot accelerator job: time S/M inference on the GPU, then distil the PDN-S teacher.

Inputs are arguments (``prepare_device_inputs.py`` makes them small enough to carry):
    python experiments/device_distill.py --images DIR --backbone-weights FILE --seconds 330 \
        --out OUT [--init TEACHER] [--skip-latency]
Writes OUT/teacher_small_mobilenet_v2.safetensors and OUT/device_report.json (see
experiments/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from models.distill import DistillConfig, distill
from models.model_card import DEFAULT_IMAGE_SIZE
from models.networks import EfficientAD


def time_inference(out: dict) -> None:
    """Model forward (map padding, resize, normalisation included), CUDA events, per batch."""
    dev = torch.device("cuda")
    for size in ("s", "m"):
        model = EfficientAD(size).to(dev).eval()
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            net = model.to(dtype)
            for batch in (1, 16):
                x = torch.rand(batch, 3, *DEFAULT_IMAGE_SIZE, device=dev, dtype=dtype)
                with torch.inference_mode():
                    for _ in range(20):
                        net(x)
                    torch.cuda.synchronize()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    n = 200
                    start.record()
                    for _ in range(n):
                        net(x)
                    end.record()
                    torch.cuda.synchronize()
                ms = start.elapsed_time(end) / n
                out[f"{size}_{dtype_name}_b{batch}_ms_per_batch"] = round(ms, 3)
                out[f"{size}_{dtype_name}_b{batch}_img_per_s"] = round(batch * 1000 / ms, 1)
        model.float()


def main() -> None:
    """Latency first (cheap, always useful), then the distillation for the remaining budget."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=330, help="distillation wall time")
    parser.add_argument("--out", type=Path, required=True, help="teacher and report folder")
    parser.add_argument("--images", type=Path, required=True, help="distillation images")
    parser.add_argument(
        "--backbone-weights",
        type=Path,
        required=True,
        help="MobileNetV2 weights (.pth or the fp16 .safetensors of prepare_device_inputs.py)",
    )
    parser.add_argument("--init", type=Path, help="warm start from this teacher file")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="resumable distillation state (default: a temporary folder)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    if not args.skip_latency:
        t0 = time.time()
        time_inference(report)
        report["latency_seconds"] = round(time.time() - t0, 1)
        print(json.dumps(report, indent=1), flush=True)
    cfg = DistillConfig(
        images=args.images,
        out=args.out / "teacher_small_mobilenet_v2.safetensors",
        backbone="mobilenet_v2",
        backbone_weights=args.backbone_weights,
        size="s",
        steps=60_000,
        batch=16,
        max_seconds=args.seconds,
        checkpoint_every=100_000,
        out_dtype="fp16",
        work_dir=args.work_dir or Path(tempfile.mkdtemp(prefix="distill-")),
        init=args.init,
        extra_meta={
            "backbone_weights_origin": "torchvision mobilenet_v2 IMAGENET1K_V1 "
            "(sha256 b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889), "
            "cast to fp16",
            "images_origin": "1000 ImageNet-1k sample images (one per class), JPEG q85, "
            "long side 512",
        },
    )
    path = distill(cfg)
    from models.checkpoint import read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    keys = ("steps", "total_steps", "final_loss", "seconds", "num_images", "taps", "init")
    report["distill"] = {k: meta.get(k) for k in keys}
    report["distill"]["loss_history_per_100_steps"] = meta["loss_history_per_100_steps"]
    (args.out / "device_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
