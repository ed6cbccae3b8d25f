"""``train``, ``distill`` and ``probe-teacher``: arguments in, one call into ``models``, JSON
out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from efficientad.cli_support import (
    DEFAULT_IMAGE_SIZE,
    EXIT_FAILURE,
    EXIT_OK,
    add_command,
    fail,
    image_size,
    model_image_size,
    settings_from_args,
)
from models.backbones import BACKBONES

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``train``, ``distill`` and ``probe-teacher``."""
    tr = add_command(
        sub,
        "train",
        cmd_train,
        help="train an EfficientAD model on normal images (paper recipe by default)",
        description="Train on DIR (MVTec category or folder layout; only normal images are used), "
        "calibrate quantiles and threshold on held-out normal images, write a model directory.",
    )
    tr.add_argument(
        "--data", type=Path, required=True, help="dataset root (MVTec category or folder)"
    )
    tr.add_argument("--out", type=Path, required=True, help="model directory to write")
    tr.add_argument("--model-size", choices=["s", "m"], default="s")
    tr.add_argument("--steps", type=int, default=70_000, help="training steps (paper: 70000)")
    tr.add_argument(
        "--teacher",
        default="auto",
        help="auto | official | shipped | random | FILE (.pth anomalib/nelson1425 "
        "keys, .safetensors, or a model directory)",
    )
    tr.add_argument("--penalty-images", type=Path, help="ImageNet-like folder for the penalty loss")
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument(
        "--image-size",
        type=model_image_size,
        default=DEFAULT_IMAGE_SIZE,
        help="N or HxW (each side 256-4096)",
    )
    tr.add_argument("--validation-fraction", type=float, default=0.1)
    tr.add_argument(
        "--threshold-data",
        type=Path,
        help="labelled validation set (good + defects) for an F1-optimal threshold",
    )
    tr.add_argument("--threshold", type=float, help="fixed image threshold on the raw score")
    tr.add_argument(
        "--threshold-margin",
        type=float,
        default=1.2,
        help="without labelled data: threshold = margin x p99.5 of normal scores",
    )
    tr.add_argument("--padding", action="store_true", help="PDN padding (sees border defects)")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--amp", action="store_true", help="bf16 mixed precision on CUDA")
    tr.add_argument("--checkpoint-every", type=int, default=1000)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    tr.add_argument("--no-progress", action="store_true")

    di = add_command(
        sub,
        "distill",
        cmd_distill,
        help="pretrain a PDN teacher by distilling an ImageNet backbone",
        description="Distil BACKBONE's stride-8/16 patch features (PatchCore aggregation, 384 ch) "
        "into a PDN teacher; output is a safetensors teacher accepted by `train --teacher`.",
    )
    di.add_argument("--backbone", default="wide_resnet101_2", choices=sorted(BACKBONES))
    di.add_argument(
        "--backbone-weights",
        type=Path,
        help="local torchvision state dict (.pth/.safetensors); default: download",
    )
    di.add_argument("--images", type=Path, required=True, help="folder of ImageNet-like images")
    di.add_argument("--size", choices=["s", "m"], default="s")
    di.add_argument("--steps", type=int, default=60_000)
    di.add_argument("--batch", type=int, default=16)
    di.add_argument("--out", type=Path, required=True, help="teacher .safetensors to write")
    di.add_argument("--stat-samples", type=int, default=10_000)
    di.add_argument("--seed", type=int, default=42)
    di.add_argument("--device", default="auto")
    di.add_argument("--fp16", action="store_true", help="store the teacher in fp16")
    di.add_argument("--max-minutes", type=float, help="stop (and save) after this wall time")
    di.add_argument("--checkpoint-every", type=int, default=500)
    di.add_argument("--resume", action="store_true")
    di.add_argument(
        "--init",
        metavar="TEACHER",
        help="warm start from a teacher file (or 'shipped'); --steps then counts new steps",
    )

    pr = add_command(
        sub,
        "probe-teacher",
        cmd_probe_teacher,
        help="rank teachers or distillation targets by nearest-neighbour AUROC (no training)",
        description="Score each test image by its patches' distance to the nearest normal "
        "training patch in the given feature space (PatchCore-style); report image AUROC per "
        "dataset. Minutes instead of a training run per dataset; a ranking signal, not "
        "EfficientAD's accuracy.",
    )
    pr.add_argument(
        "--data", type=Path, action="append", required=True, help="MVTec category (repeatable)"
    )
    pr.add_argument(
        "--teacher",
        action="append",
        default=[],
        help="teacher source as in `train --teacher` (repeatable)",
    )
    pr.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="BACKBONE[=WEIGHTS]",
        help="a backbone's distillation target, weights from a local file or torchvision",
    )
    pr.add_argument("--size", choices=["s", "m"], default="s")
    pr.add_argument("--image-size", type=image_size, default=DEFAULT_IMAGE_SIZE)
    pr.add_argument("--bank-size", type=int, default=30_000, help="memory bank patches kept")
    pr.add_argument("--seed", type=int, default=0)


def cmd_train(args: argparse.Namespace) -> int:
    from models.data import DataError
    from models.model_card import ModelCard
    from models.teacher import TeacherError
    from models.train import TrainConfig, train

    cfg = settings_from_args(TrainConfig, args, progress=not args.no_progress)
    try:
        out = train(cfg)
    except (DataError, TeacherError, ValueError) as exc:
        fail(str(exc))
    except FloatingPointError as exc:
        fail(str(exc), EXIT_FAILURE)
    card = ModelCard.load(out)
    print(
        json.dumps(
            {
                "model": str(out),
                "threshold": card.threshold,
                "threshold_method": card.threshold_method,
                "steps_per_second": (card.training or {}).get("steps_per_second"),
                "teacher": card.teacher.source if card.teacher else None,
            }
        )
    )
    return EXIT_OK


def cmd_distill(args: argparse.Namespace) -> int:
    from models.backbones import BackboneError
    from models.distill import DistillConfig, DistillError, distill

    cfg = settings_from_args(
        DistillConfig,
        args,
        out_dtype="fp16" if args.fp16 else "fp32",
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        init=Path(args.init) if args.init else None,
    )
    try:
        path = distill(cfg)
    except (DistillError, BackboneError) as exc:
        fail(str(exc))
    print(json.dumps({"teacher": str(path)}))
    return EXIT_OK


def cmd_probe_teacher(args: argparse.Namespace) -> int:
    import numpy as np

    from models.backbones import BackboneError
    from models.data import DataError, discover_dataset
    from models.feature_probe import (
        ProbeSettings,
        knn_probe,
        target_features,
        teacher_features,
    )
    from models.teacher import TeacherError

    if not args.teacher and not args.target:
        args.teacher = ["shipped"]
    try:
        datasets = [discover_dataset(d) for d in args.data]
        sources = {f"teacher:{t}": teacher_features(t, args.size) for t in args.teacher}
        for spec in args.target:
            name, _, weights = spec.partition("=")
            if name not in BACKBONES:
                raise BackboneError(
                    f"--target {spec!r}: unknown backbone {name!r}; "
                    f"choose one of {', '.join(sorted(BACKBONES))}"
                )
            sources[f"target:{name}"] = target_features(name, Path(weights) if weights else None)
        settings = ProbeSettings(args.image_size, args.bank_size, seed=args.seed)
        report: dict[str, Any] = {"results": [], "mean_image_auroc": {}}
        for label, features in sources.items():
            rows = [knn_probe(features, d, settings) for d in datasets]
            for row in rows:
                report["results"].append({"features": label, **row.__dict__})
            report["mean_image_auroc"][label] = float(np.mean([r.image_auroc for r in rows]))
    except (DataError, TeacherError, BackboneError, ValueError) as exc:
        fail(str(exc))
    print(json.dumps(report, indent=1))
    return EXIT_OK
