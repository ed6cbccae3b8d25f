"""``efficientad import-anomalib``: turn an anomalib EfficientAD checkpoint into a model directory.

Exit codes: 0 imported, 1 could not write the output, 2 bad input (unreadable or refused file,
weights that do not fit, missing statistics or threshold, bad arguments).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from efficientad.cli_support import EXIT_FAILURE, EXIT_OK, add_command, fail, model_image_size

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``import-anomalib`` to the ``efficientad`` CLI."""
    p = add_command(
        sub,
        "import-anomalib",
        cmd_import_anomalib,
        help="import an EfficientAD model trained with anomalib (.ckpt or state dict)",
        description="Convert an anomalib EfficientAD Lightning .ckpt, the Lightning module's state "
        "dict, or a plain EfficientAdModel state dict into a model directory. The file is read "
        "with torch.load(weights_only=True); pickled code is never executed. Model size comes "
        "from the weights, padding/pad_maps from the checkpoint's hyper-parameters, image size "
        "from its pre-processor and the threshold from its post-processor; options override. "
        "A file without a threshold needs --threshold.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="anomalib .ckpt / .pt / .pth file")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--name", help="model name (default: the --out folder name)")
    p.add_argument(
        "--threshold",
        type=float,
        help="image threshold on the raw score (overrides the checkpoint's)",
    )
    p.add_argument(
        "--model-size",
        choices=["s", "m"],
        help="expected size; checked against the weights (default: detect)",
    )
    p.add_argument(
        "--padding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="PDN padding the model was trained with (default: from the checkpoint, else False)",
    )
    p.add_argument(
        "--pad-maps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pad the raw maps by 4 before resizing (default: from the checkpoint, else True)",
    )
    p.add_argument(
        "--image-size",
        type=model_image_size,
        help="N or HxW (each side 256-4096) the model runs at (default: the checkpoint's "
        "Resize, else 256)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing model in --out")


def cmd_import_anomalib(args: argparse.Namespace) -> int:
    from models.anomalib_import import AnomalibImportError, import_anomalib
    from models.model_card import ModelCard

    try:
        out = import_anomalib(
            args.file,
            args.out,
            name=args.name,
            image_size=args.image_size,
            threshold=args.threshold,
            model_size=args.model_size,
            padding=args.padding,
            pad_maps=args.pad_maps,
            overwrite=args.force,
        )
    except AnomalibImportError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {args.out}: {exc}", EXIT_FAILURE)
    card = ModelCard.load(out)
    print(
        json.dumps(
            {
                "model": str(out),
                "model_size": card.model_size,
                "padding": card.padding,
                "pad_maps": card.pad_maps,
                "image_size": list(card.image_size),
                "threshold": card.threshold,
                "threshold_method": card.threshold_method,
                "sha256": card.weights_sha256,
            }
        )
    )
    return EXIT_OK
