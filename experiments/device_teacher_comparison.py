"""Accelerator job: EfficientAD-S with each teacher (default: shipped vs random) on every dataset.

Same steps, seeds and penalty images for every teacher; writes results.json after every run so a
partial run still reports, with per-teacher means over datasets and seeds. On a CUDA machine:
    python experiments/device_teacher_comparison.py --data DIR --penalty DIR \
        --budget-seconds 330 --out OUT [--teachers shipped,random,FILE] [--seeds 42,43]
``--data`` holds one MVTec-layout folder per dataset (every sub-folder is used unless
``--datasets`` names some); see experiments/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

from models.data import discover_dataset
from models.evaluate import evaluate
from models.inference import InferenceEngine
from models.model_card import ModelCard
from models.train import TrainConfig, train


def run_one(data: Path, teacher: str, steps: int, penalty: Path, work: Path, seed: int) -> dict:
    t0 = time.time()
    model_dir = train(
        TrainConfig(
            data=data,
            out=work / f"{data.name}-{Path(teacher).stem}-{seed}",
            steps=steps,
            teacher=teacher,
            penalty_images=penalty,
            seed=seed,
            progress=False,
            checkpoint_every=10**9,
        )
    )
    card = ModelCard.load(model_dir)
    report = evaluate(InferenceEngine.load(model_dir), discover_dataset(data), batch_size=16)
    m = report.overall
    return {
        "dataset": data.name,
        "teacher": teacher,
        "seed": seed,
        "steps": steps,
        "image_auroc": m.image_auroc,
        "image_f1": m.image_f1,
        "pixel_auroc": m.pixel_auroc,
        "au_pro": m.au_pro,
        "f1_at_threshold": m.at_model_threshold.f1 if m.at_model_threshold else None,
        "train_steps_per_s": (card.training or {})["steps_per_second"],
        "seconds": round(time.time() - t0, 1),
        "per_type": {
            k: {"image_auroc": v.image_auroc, "au_pro": v.au_pro}
            for k, v in report.per_type.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of MVTec-layout datasets")
    p.add_argument("--datasets", nargs="+", default=None, help="sub-folders of --data to use")
    p.add_argument("--penalty", type=Path, required=True, help="penalty (ImageNet-like) images")
    p.add_argument("--work", type=Path, default=None, help="model folder (default: temporary)")
    p.add_argument("--budget-seconds", type=float, default=330)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=0, help="0: fit the budget")
    p.add_argument("--teachers", default="shipped,random", help="comma-separated teacher sources")
    p.add_argument("--seeds", default="42", help="comma-separated training seeds")
    args = p.parse_args()
    teachers = args.teachers.split(",")
    seeds = [int(v) for v in args.seeds.split(",")]
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    work = args.work or Path(tempfile.mkdtemp(prefix="teacher-comparison-"))
    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "runs": [],
    }
    names = args.datasets or sorted(d.name for d in args.data.iterdir() if d.is_dir())
    datasets = [args.data / name for name in names if (args.data / name).is_dir()]
    steps = args.steps
    if steps <= 0:
        t0 = time.time()
        probe = run_one(datasets[0], teachers[0], 200, args.penalty, work / "probe", seeds[0])
        overhead = time.time() - t0 - 200 / probe["train_steps_per_s"]
        per_run = args.budget_seconds / (len(datasets) * len(teachers) * len(seeds)) - overhead
        steps = int(max(300, min(8000, per_run * probe["train_steps_per_s"])) // 100 * 100)
        results["probe"] = {**probe, "overhead_s": round(overhead, 1)}
    results["steps"] = steps
    print(json.dumps({"steps": steps, "probe": results.get("probe")}), flush=True)
    for seed in seeds:
        for data in datasets:
            for teacher in teachers:
                row = run_one(data, teacher, steps, args.penalty, work, seed)
                results["runs"].append(row)
                results["means"] = means(results["runs"])
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
                keys = (
                    "dataset",
                    "teacher",
                    "seed",
                    "image_auroc",
                    "au_pro",
                    "image_f1",
                    "seconds",
                )
                print(json.dumps({k: row[k] for k in keys}), flush=True)
    print(json.dumps({"means": results["means"]}), flush=True)


def means(runs: list[dict]) -> dict:
    """Per teacher: mean image AUROC / AU-PRO over the (dataset, seed) runs finished so far."""
    out: dict = {}
    for teacher in dict.fromkeys(r["teacher"] for r in runs):
        rows = [r for r in runs if r["teacher"] == teacher]
        out[teacher] = {
            "runs": len(rows),
            "image_auroc": sum(r["image_auroc"] for r in rows) / len(rows),
            "au_pro": sum(r["au_pro"] or 0.0 for r in rows) / len(rows),
        }
    return out


if __name__ == "__main__":
    main()
