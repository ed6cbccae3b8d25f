"""The model card: ``model.json`` as one typed, validated object, and the image size rules.

A model directory holds ``model.safetensors`` and ``model.json``. Training and the anomalib import
write the card through ``ModelCard.save``; everything that reads a model (inference, the demo,
the benches, the CLI) reads it through ``ModelCard.load``, so a card that cannot run (a NaN
threshold, an image size outside 256-4096) is refused at load with the field and the value named,
instead of failing at the first frame or never alarming.

The fields inference needs are typed; provenance (validation scores, dataset, training config,
anomalib hyper-parameters, ...) is kept as plain JSON, and unknown keys from newer writers are
kept too (``extra="allow"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.version import __version__

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "FORMAT",
    "MAX_IMAGE_SIDE",
    "META_FILE",
    "MIN_IMAGE_SIDE",
    "CheckpointError",
    "ImageSizeError",
    "ModelCard",
    "TeacherProvenance",
    "check_image_size",
    "field_error",
    "finite_problem",
    "image_size_problem",
]

META_FILE = "model.json"
FORMAT = "efficientad-line/model"

#: EfficientAD's autoencoder needs at least 256 px: its 8x8 bottleneck kernel needs an 8x8 map
MIN_IMAGE_SIDE = 256
#: above this one frame's feature maps take many GB
MAX_IMAGE_SIDE = 4096
DEFAULT_IMAGE_SIZE: tuple[int, int] = (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the network."""


class ImageSizeError(ValueError):
    """An image size EfficientAD cannot run at."""


def image_size_problem(height: int, width: int) -> str | None:
    """Why a model cannot run at ``height`` x ``width``, or None when it can."""
    if all(MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE for side in (height, width)):
        return None
    return (
        f"each side must be in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] px (EfficientAD's "
        f"autoencoder needs >= {MIN_IMAGE_SIDE} px for its 8x8 bottleneck; above "
        f"{MAX_IMAGE_SIDE} one frame needs many GB)"
    )


def check_image_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` if a model can run at it; ``ImageSizeError`` saying why not."""
    problem = image_size_problem(height, width)
    if problem is not None:
        too = "small" if min(height, width) < MIN_IMAGE_SIDE else "large"
        raise ImageSizeError(f"image size {height}x{width} is too {too}: {problem}")
    return int(height), int(width)


def finite_problem(value: float) -> str | None:
    """Why a threshold or score bound is unusable (NaN never alarms), or None."""
    if math.isfinite(value):
        return None
    return "must be a finite number (with NaN or inf no frame is ever judged correctly)"


def _shown(field: str, value: Any) -> str:
    if field == "image_size" and isinstance(value, list | tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return repr(value)


def field_error(field: str, value: Any, problem: str) -> CheckpointError:
    """``CheckpointError("field = value: problem")``: the one shape of a card error."""
    return CheckpointError(f"{field} = {_shown(field, value)}: {problem}")


class TeacherProvenance(BaseModel):
    """Where the teacher came from: ``source`` (official, shipped, file, checkpoint, random,
    anomalib), a location and the file's sha256; source-specific details are kept as extras."""

    model_config = ConfigDict(extra="allow", frozen=True)

    source: str
    location: str = ""
    sha256: str | None = None


class ModelCard(BaseModel):
    """``model.json``: what inference needs (typed, checked) plus the provenance of the model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: str = FORMAT
    format_version: int = 1
    package_version: str = __version__
    name: str = Field(min_length=1)
    version: str
    model_size: Literal["s", "m"]
    padding: bool = False
    pad_maps: bool = True
    image_size: tuple[int, int]
    threshold: float
    threshold_method: str = ""
    score_min: float
    score_max: float
    score_range_method: str | None = None
    quantiles: dict[str, float] | None = None
    teacher: TeacherProvenance | None = None
    weights_sha256: str = ""  # of model.safetensors, set by save_checkpoint; checked on load
    # provenance written by training / the import (plain JSON)
    validation: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    total_seconds: float | None = None

    @field_validator("format")
    @classmethod
    def _our_format(cls, value: str) -> str:
        if value != FORMAT:
            raise ValueError(f"expected {FORMAT!r} (not a model directory of this package)")
        return value

    @field_validator("image_size")
    @classmethod
    def _runnable_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        problem = image_size_problem(*value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("threshold", "score_min", "score_max")
    @classmethod
    def _finite(cls, value: float) -> float:
        problem = finite_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    # ----------------------------------------------------------------------------- reading

    @classmethod
    def from_mapping(cls, data: Any, source: str | Path = "model card") -> ModelCard:
        """Validate a ``model.json`` object; ``CheckpointError`` names every bad field."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = ".".join(str(p) for p in err.get("loc", ())) or "model.json"
                if err.get("type") == "missing":
                    problems.append(f"{field}: missing")
                    continue
                reason = str(err.get("msg", "invalid")).removeprefix("Value error, ")
                value = data.get(field, err.get("input")) if "." not in field else err["input"]
                problems.append(str(field_error(field, value, reason)))
            raise CheckpointError(f"{source}: " + "; ".join(problems)) from None

    @classmethod
    def create(cls, **fields: Any) -> ModelCard:
        """A new card (training, the import); ``CheckpointError`` names every bad field."""
        return cls.from_mapping(fields, "new model card")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """The card of a model directory (or of the directory holding a weights file)."""
        path = Path(path)
        meta_path = path / META_FILE if path.is_dir() else path.with_name(META_FILE)
        if not meta_path.is_file():
            raise CheckpointError(
                f"{path}: no {META_FILE} next to the weights; not a model checkpoint"
            )
        try:
            data = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_path}: invalid JSON ({exc})") from exc
        return cls.from_mapping(data, meta_path)

    # ----------------------------------------------------------------------------- writing

    def as_json(self) -> dict[str, Any]:
        """The JSON object ``save`` writes (optional fields never set are left out)."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if v is not None or k in self.model_fields_set}

    def save(self, model_dir: str | Path) -> Path:
        """Write ``model_dir/model.json`` atomically (a reader never sees half a card)."""
        target = Path(model_dir) / META_FILE
        tmp = target.with_name(META_FILE + ".tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=2, sort_keys=True))
        tmp.replace(target)
        return target
