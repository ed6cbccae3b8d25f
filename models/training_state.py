"""Resumable training state (weights, Adam moments, step, RNG) in safetensors + JSON, no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_FILE = "state.safetensors"
STATE_META = "state.json"


def save_training_state(
    directory: Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{prefix}.{key}"] = value.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    for idx, slot in opt_state["state"].items():
        for name, value in slot.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = t.detach().cpu().contiguous()
    for name, gen in (generators or {}).items():
        tensors[f"rng.{name}"] = gen.get_state().cpu()
    tmp = directory / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp))
    meta = {"step": step, "param_groups": opt_state["param_groups"], "extra": extra}
    tmp_meta = directory / (STATE_META + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    tmp.replace(directory / STATE_FILE)
    tmp_meta.replace(directory / STATE_META)


def has_training_state(directory: Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file() and (Path(directory) / STATE_META).is_file()


def load_training_state(
    directory: Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore in place; returns (step, extra)."""
    directory = Path(directory)
    tensors = load_file(str(directory / STATE_FILE))
    meta = json.loads((directory / STATE_META).read_text())
    for prefix, module in modules.items():
        head = f"module.{prefix}."
        state = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
        module.load_state_dict(state, strict=True)
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict(opt_state)
    for name, gen in (generators or {}).items():
        if f"rng.{name}" in tensors:
            gen.set_state(tensors[f"rng.{name}"])
    return int(meta["step"]), meta.get("extra", {})
