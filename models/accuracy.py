"""The accuracy benchmark: train and evaluate every category of an MVTec-AD-style root.

Reports anomalib-style tables (``efficientad accuracy``; the speed benches are
``models.speed_bench`` and ``pipeline.tools.bench_pipeline``). For each model size and each
category (a folder with ``train/good``) it trains with
``models.train.train``, evaluates the test split with ``models.evaluate.evaluate`` and records all
metrics and timings. Results are written to the JSON file after every category, so an
interrupted run keeps what it finished; a category that fails is recorded with its error and the
run goes on. The two Markdown tables follow the seed tables of anomalib's EfficientAD README
("Image-Level AUC", "Image F1 Score"): one row per model size, Avg first, then the categories (the
canonical MVTec AD order when all categories are MVTec AD ones, otherwise the order on disk).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.data import DataError, discover_dataset, mvtec_categories
from models.model_card import DEFAULT_IMAGE_SIZE

log = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    ("carpet", "Carpet"),
    ("grid", "Grid"),
    ("leather", "Leather"),
    ("tile", "Tile"),
    ("wood", "Wood"),
    ("bottle", "Bottle"),
    ("cable", "Cable"),
    ("capsule", "Capsule"),
    ("hazelnut", "Hazelnut"),
    ("metal_nut", "Metal Nut"),
    ("pill", "Pill"),
    ("screw", "Screw"),
    ("toothbrush", "Toothbrush"),
    ("transistor", "Transistor"),
    ("zipper", "Zipper"),
)
_MVTEC_ORDER = {name: i for i, (name, _) in enumerate(MVTEC_CATEGORIES)}
_MVTEC_TITLES = dict(MVTEC_CATEGORIES)


@dataclass
class AccuracyConfig:
    root: Path
    out_dir: Path
    categories: list[str] | None = None
    model_sizes: Sequence[str] = ("s",)
    steps: int = 70_000
    teacher: str = "auto"
    penalty_images: Path | None = None
    seed: int = 42
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    batch_size: int = 8
    device: str = "auto"
    json_path: Path | None = None


@dataclass
class AccuracyResult:
    config: AccuracyConfig
    categories: list[str]
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any("error" in r for per in self.results.values() for r in per.values())

    def averages(self, size: str) -> dict[str, float | None]:
        rows = [r for r in self.results.get(size, {}).values() if "error" not in r]
        out: dict[str, float | None] = {}
        for key in ("image_auroc", "image_f1", "pixel_auroc", "au_pro"):
            values = [r[key] for r in rows if r.get(key) is not None]
            out[key] = sum(values) / len(values) if values else None
        return out

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "root": str(c.root),
            "out_dir": str(c.out_dir),
            "model_sizes": list(c.model_sizes),
            "steps": c.steps,
            "teacher": c.teacher,
            "penalty_images": str(c.penalty_images) if c.penalty_images else None,
            "seed": c.seed,
            "image_size": list(c.image_size),
            "categories": self.categories,
            "results": self.results,
            "averages": {size: self.averages(size) for size in c.model_sizes},
            "tables": markdown_tables(self),
        }


def category_title(name: str) -> str:
    return _MVTEC_TITLES.get(name, name)


def find_categories(root: Path, wanted: Sequence[str] | None = None) -> list[Path]:
    """Category folders to run, in table order; ``root`` itself when it is one category."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        found = [root]
    else:
        found = mvtec_categories(root)
        if not found:
            raise DataError(f"{root}: no category folders with train/good below it")
    if wanted:
        by_name = {p.name.lower(): p for p in found}
        by_title = {category_title(p.name).lower(): p for p in found}
        selected = []
        for name in wanted:
            key = name.lower()
            path = by_name.get(key) or by_title.get(key)
            if path is None:
                raise DataError(
                    f"category {name!r} not found under {root}; available: "
                    f"{', '.join(p.name for p in found)}"
                )
            selected.append(path)
        found = selected
    if all(p.name in _MVTEC_ORDER for p in found):
        found = sorted(found, key=lambda p: _MVTEC_ORDER[p.name])
    return found


def _fmt(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def markdown_tables(result: AccuracyResult) -> str:
    """The "Image-Level AUC" and "Image F1 Score" tables, anomalib README layout."""
    titles = [category_title(name) for name in result.categories]
    header = "| " + " | ".join(["", "Avg", *titles]) + " |"
    rule = (
        "| "
        + " | ".join(["-" * 14] + [":" + "-" * max(3, len(t) - 2) + ":" for t in ["Avg", *titles]])
        + " |"
    )
    blocks = []
    for heading, key in (("Image-Level AUC", "image_auroc"), ("Image F1 Score", "image_f1")):
        lines = [f"### {heading}", "", header, rule]
        for size in result.config.model_sizes:
            per = result.results.get(size, {})
            cells = [
                _fmt(per.get(name, {}).get(key)) if "error" not in per.get(name, {}) else "err"
                for name in result.categories
            ]
            avg = result.averages(size)[key]
            lines.append(
                "| " + " | ".join([f"EfficientAd-{size.upper()}", _fmt(avg), *cells]) + " |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _write_json(result: AccuracyResult) -> None:
    path = result.config.json_path
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    tmp.replace(path)


def run_accuracy(config: AccuracyConfig, report: Callable[[str], None] = print) -> AccuracyResult:
    """Train and evaluate each (model size, category); returns all results."""
    from models.evaluate import evaluate
    from models.inference import InferenceEngine
    from models.train import TrainConfig, train

    for size in config.model_sizes:
        if size not in ("s", "m"):
            raise ValueError(f"model size must be 's' or 'm', got {size!r}")
    categories = find_categories(config.root, config.categories)
    result = AccuracyResult(config=config, categories=[p.name for p in categories])
    for size in config.model_sizes:
        per_size = result.results.setdefault(size, {})
        for category in categories:
            entry: dict[str, Any] = {}
            per_size[category.name] = entry
            model_dir = Path(config.out_dir) / size / category.name
            try:
                dataset = discover_dataset(category)
                started = time.perf_counter()
                trained = train(
                    TrainConfig(
                        data=category,
                        out=model_dir,
                        model_size=size,
                        steps=config.steps,
                        teacher=config.teacher,
                        penalty_images=config.penalty_images,
                        seed=config.seed,
                        image_size=tuple(config.image_size),
                    )
                )
                entry["train_seconds"] = time.perf_counter() - started
                engine = InferenceEngine.load(trained or model_dir, device=config.device)
                evaluation = evaluate(engine, dataset, batch_size=config.batch_size)
            except Exception as exc:  # one broken category must not lose a night of results
                log.exception("accuracy run %s/%s failed", size, category.name)
                entry["error"] = f"{type(exc).__name__}: {exc}"
                report(f"[{size}] {category.name}: FAILED: {entry['error']}")
                _write_json(result)
                continue
            overall = evaluation.overall
            entry.update(
                model_dir=str(trained or model_dir),
                image_auroc=overall.image_auroc,
                image_f1=overall.image_f1,
                image_f1_threshold=overall.image_f1_threshold,
                pixel_auroc=overall.pixel_auroc,
                au_pro=overall.au_pro,
                eval_seconds=evaluation.seconds,
                eval_images_per_second=evaluation.images_per_second,
                evaluation=evaluation.to_dict(),
            )
            report(
                f"[{size}] {category_title(category.name)}: I-AUROC {_fmt(overall.image_auroc)} "
                f"I-F1 {_fmt(overall.image_f1)} P-AUROC {_fmt(overall.pixel_auroc)} "
                f"AU-PRO {_fmt(overall.au_pro)} (train {entry['train_seconds']:.0f} s, "
                f"eval {evaluation.seconds:.1f} s)"
            )
            _write_json(result)
    _write_json(result)
    return result
