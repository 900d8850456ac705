"""Saving and loading the image-side models (VQ-GAN, CXR encoder, k-means baseline) as a folder of
``<name>.pt`` (state dict) + ``<name>.json`` (config and metadata), loadable without the training config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def save_module(module: torch.nn.Module, directory: str | Path, name: str, meta: dict[str, Any]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, d / f"{name}.pt")
    (d / f"{name}.json").write_text(json.dumps(meta, indent=2))
    return d


def read_saved(directory: str | Path, name: str, error: type[Exception], hint: str,
               map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, state dict) of a folder written by :func:`save_module`; ``error(hint)`` when it is not one."""
    d = Path(directory)
    meta_path, weights_path = d / f"{name}.json", d / f"{name}.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise error(f"{d} needs {meta_path.name} and {weights_path.name}: {hint}")
    return json.loads(meta_path.read_text()), torch.load(weights_path, map_location=map_location, weights_only=True)


def config_from_saved(cls: type[T], saved: dict[str, Any]) -> T:
    """A config dataclass from saved fields, ignoring fields this code no longer has."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in saved.items() if k in names})


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source} does not match the architecture it describes: {e}") from None
