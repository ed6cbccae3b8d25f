"""The model card: model.json typed, validated with the field and value named, round-tripped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.model_card import (
    DEFAULT_IMAGE_SIZE,
    META_FILE,
    CheckpointError,
    ImageSizeError,
    ModelCard,
    check_image_size,
)

CARD = {
    "name": "line-s",
    "version": "20250101T000000Z",
    "model_size": "s",
    "image_size": [256, 320],
    "threshold": 0.4,
    "score_min": 0.1,
    "score_max": 0.9,
    "teacher": {"source": "shipped", "location": "t.safetensors", "sha256": None, "steps": 8030},
    "training": {"steps": 40, "final_losses": {"loss": 0.5}},
    "future_key": {"from": "a newer writer"},
}


def test_a_card_round_trips_with_provenance_and_unknown_keys(tmp_path: Path) -> None:
    card = ModelCard.from_mapping(CARD)
    assert card.image_size == (256, 320) and card.teacher is not None
    assert card.teacher.source == "shipped" and card.teacher.model_extra == {"steps": 8030}
    card.save(tmp_path)
    written = json.loads((tmp_path / META_FILE).read_text())
    assert written["future_key"] == {"from": "a newer writer"}  # kept, not dropped
    assert written["format"] == "efficientad-line/model" and written["padding"] is False
    assert "score_range_method" not in written  # optional fields never set are left out
    again = ModelCard.load(tmp_path)
    assert again == card and again.as_json() == written


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"threshold": float("nan")}, "threshold = nan: must be a finite number"),
        ({"score_max": float("inf")}, "score_max = inf: must be a finite number"),
        ({"image_size": [128, 256]}, "image_size = 128x256: each side must be in [256, 4096]"),
        ({"model_size": "xl"}, "model_size = 'xl'"),
        ({"format": "anomalib"}, "format = 'anomalib'"),
        ({"name": None}, "name = None"),
    ],
)
def test_a_bad_field_is_named_with_its_value(change: dict, shown: str) -> None:
    with pytest.raises(CheckpointError) as info:
        ModelCard.from_mapping({**CARD, **change}, "m/model.json")
    assert str(info.value).startswith("m/model.json: ") and shown in str(info.value)


def test_missing_fields_are_listed_and_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="threshold: missing; score_min: missing"):
        ModelCard.from_mapping(
            {k: v for k, v in CARD.items() if k not in ("threshold", "score_min")}
        )
    with pytest.raises(CheckpointError, match=r"no model\.json"):
        ModelCard.load(tmp_path)
    (tmp_path / META_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        ModelCard.load(tmp_path)


def test_image_size_rule() -> None:
    assert DEFAULT_IMAGE_SIZE == (256, 256)
    assert check_image_size(256, 4096) == (256, 4096)
    with pytest.raises(ImageSizeError, match=r"too small: each side must be in \[256, 4096\]"):
        check_image_size(255, 256)
    with pytest.raises(ImageSizeError, match="too large"):
        check_image_size(256, 4097)
