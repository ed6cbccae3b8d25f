"""The real datasets in ../shared/data load through discover_dataset (skipped where absent).

The folder is ``../shared/data`` relative to the repository root, or ``$EFFICIENTAD_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.data import discover_dataset, load_mask, load_rgb, to_tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EFFICIENTAD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# name: (train good, test good, test defective); every defective image has a mask
EXPECTED = {
    "hazelnut_toy": (28, 6, 17),
    "battery_weld": (37, 35, 93),
    "cookies": (31, 14, 32),
    "mpdd_metal_plate": (48, 32, 81),
}

pytestmark = pytest.mark.shared_data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_dataset_loads(name: str):
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} not present (shared data is not part of the project)")
    ds = discover_dataset(root)
    n_train, n_good, n_defective = EXPECTED[name]
    assert ds.layout == "mvtec"
    assert len(ds.train) == n_train
    assert sum(s.label == 0 for s in ds.test) == n_good
    defective = [s for s in ds.test if s.label == 1]
    assert len(defective) == n_defective
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in defective)
    assert len(ds.fingerprint()) == 64

    # one image of each kind decodes to RGB and its mask has defect pixels
    for sample in (ds.train[0], defective[0]):
        image = load_rgb(sample.path)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        assert to_tensor(image, (256, 256)).shape == (3, 256, 256)
    assert load_mask(defective[0], (256, 256)).any()
