"""anomalib's real ``EfficientAdModel``, loaded from the pinned PyPI wheel without installing it.

The wheel is fetched with ``pip download anomalib==VERSION --no-deps --require-hashes`` into
``$EFFICIENTAD_TEST_CACHE`` (default ``~/.cache/efficientad-test``) and only these files are used:

- ``anomalib/models/image/efficient_ad/torch_model.py``: executed unchanged, as module
  ``anomalib.models.image.efficient_ad.torch_model``. It is the code under comparison: networks,
  teacher normalisation, map padding, resizing and quantile normalisation, score.
- ``anomalib/data/dataclasses/torch/base.py``: only the ``InferenceBatch`` NamedTuple is taken
  (its class definition is compiled from the wheel's source via ``ast``).
- ``anomalib/post_processing/post_processor.py``: only the static methods
  ``PostProcessor._normalize`` and ``PostProcessor._apply_threshold`` (same way), to check that
  thresholds and normalised scores carry over.

Stubbed, and why: ``torch_model.py``'s single anomalib-internal import is
``from anomalib.data import InferenceBatch``. The real ``anomalib.data`` package imports lightning,
torchmetrics, kornia, opencv-python and more (anomalib's full dependency set, which clashes with
our headless OpenCV build), so ``anomalib``, ``anomalib.data`` and the parent packages of the model
module are empty stand-in modules, and ``anomalib.data.InferenceBatch`` is the wheel's own class.
They are placed in ``sys.modules`` only while the module executes and while the tests pickle
anomalib's ``EfficientAdModelSize`` enum (``registered()``), then removed again.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

VERSION = "2.7.0"
WHEEL = f"anomalib-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "8b31490815670549a3901068addd0306856c174c032ba93388e7b37b90219332"
TORCH_MODEL = "anomalib/models/image/efficient_ad/torch_model.py"
DATACLASSES = "anomalib/data/dataclasses/torch/base.py"
POST_PROCESSOR = "anomalib/post_processing/post_processor.py"
MODULE_NAME = "anomalib.models.image.efficient_ad.torch_model"
_PACKAGES = (
    "anomalib",
    "anomalib.data",
    "anomalib.models",
    "anomalib.models.image",
    "anomalib.models.image.efficient_ad",
)


class ReferenceUnavailable(RuntimeError):
    """The anomalib wheel could not be obtained (offline, no pip...)."""


def cache_dir() -> Path:
    root = os.environ.get("EFFICIENTAD_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "efficientad-test"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_wheel() -> Path:
    """The pinned wheel, downloaded once and verified by sha256."""
    folder = cache_dir() / "wheels"
    wheel = folder / WHEEL
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"anomalib=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "-q",
            "-r",
            str(req),
            "-d",
            str(folder),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ReferenceUnavailable(f"pip download anomalib=={VERSION} failed: {exc}") from exc
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ReferenceUnavailable(f"pip download anomalib=={VERSION} failed: {' | '.join(tail)}")
    if _sha256(wheel) != WHEEL_SHA256:
        raise ReferenceUnavailable(f"{wheel}: sha256 mismatch")
    return wheel


def _extract(wheel: Path, member: str) -> Path:
    target = cache_dir() / f"anomalib-{VERSION}" / member
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    if not target.is_file() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target


def _compile_definition(
    source_path: Path, class_name: str, member: str | None, namespace: dict[str, Any]
) -> Any:
    """Compile one class (or one method of a class, without decorators) from a wheel file."""
    tree = ast.parse(source_path.read_text(), filename=str(source_path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    node: ast.stmt = cls
    if member is not None:
        fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == member)
        fn.decorator_list = []
        node = fn
    module = ast.Module(body=[node], type_ignores=[])
    exec(compile(module, str(source_path), "exec"), namespace)  # anomalib's own definition
    return namespace[member or class_name]


@dataclass
class AnomalibReference:
    version: str
    wheel: Path
    torch_model: types.ModuleType
    normalize: Callable[..., torch.Tensor]  # PostProcessor._normalize
    apply_threshold: Callable[..., torch.Tensor]  # PostProcessor._apply_threshold
    stubs: dict[str, types.ModuleType]

    def model(self, size: str, padding: bool = False, pad_maps: bool = True) -> torch.nn.Module:
        tm = self.torch_model
        model_size = tm.EfficientAdModelSize.S if size == "s" else tm.EfficientAdModelSize.M
        return tm.EfficientAdModel(
            teacher_out_channels=384, model_size=model_size, padding=padding, pad_maps=pad_maps
        )


@contextmanager
def _in_sys_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


@contextmanager
def registered(ref: AnomalibReference) -> Iterator[None]:
    """anomalib's module names importable, e.g. to pickle its enums like anomalib would."""
    with _in_sys_modules({**ref.stubs, MODULE_NAME: ref.torch_model}):
        yield


def load_reference() -> AnomalibReference:
    wheel = fetch_wheel()
    torch_model_py = _extract(wheel, TORCH_MODEL)
    dataclasses_py = _extract(wheel, DATACLASSES)
    post_py = _extract(wheel, POST_PROCESSOR)

    inference_batch = _compile_definition(
        dataclasses_py,
        "InferenceBatch",
        None,
        {"NamedTuple": NamedTuple, "torch": torch, "__name__": "anomalib.data"},
    )
    stubs: dict[str, types.ModuleType] = {}
    for name in _PACKAGES:
        module = types.ModuleType(name, "stand-in package (see tests/anomalib_ref/reference.py)")
        module.__path__ = []  # a package, so submodule imports resolve through sys.modules
        stubs[name] = module
    stubs["anomalib.data"].InferenceBatch = inference_batch

    spec = importlib.util.spec_from_file_location(MODULE_NAME, torch_model_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _in_sys_modules({**stubs, MODULE_NAME: module}):
        spec.loader.exec_module(module)

    post_ns: dict[str, Any] = {"torch": torch}
    normalize = _compile_definition(post_py, "PostProcessor", "_normalize", post_ns)
    apply_threshold = _compile_definition(post_py, "PostProcessor", "_apply_threshold", post_ns)
    return AnomalibReference(VERSION, wheel, module, normalize, apply_threshold, stubs)
