"""Saving and loading the image-side models (VQ-GAN, CXR encoder) as a folder of ``<stem>.pt`` (state dict) +
``<stem>.json`` (format version, config and metadata), loadable without the training config."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from mavilt.checkpoints import ModelFiles
from mavilt.errors import CheckpointError

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound="SavedModel")


def config_from_saved(cls: type[T], saved: dict[str, Any]) -> T:
    """A config dataclass from saved fields; fields this code no longer has are dropped with a warning."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(saved) - names)
    if unknown:
        log.warning("ignoring saved %s fields this code does not know: %s", cls.__name__, ", ".join(unknown))
    return cls(**{k: v for k, v in saved.items() if k in names})


class SavedModel:
    """Mixin for an ``nn.Module`` saved with :meth:`save_pretrained` and loaded with :meth:`from_pretrained`.

    A subclass names its files (``FILES``), says what a folder is when it is not one (``LOAD_HINT``), and
    converts itself to and from the saved metadata (``saved_meta`` / ``from_saved_meta``)."""

    FILES: ClassVar[ModelFiles]
    FORMAT_VERSION: ClassVar[int] = 1
    LOAD_ERROR: ClassVar[type[Exception]] = CheckpointError
    LOAD_HINT: ClassVar[str] = ""

    def saved_meta(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_saved_meta(cls: type[M], meta: dict[str, Any], directory: Path) -> M:
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, d / self.FILES.weights)  # type: ignore[attr-defined]
        (d / self.FILES.meta).write_text(json.dumps({"format_version": self.FORMAT_VERSION, **self.saved_meta()}, indent=2))
        return d

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, map_location: str | torch.device = "cpu") -> M:
        d = Path(directory)
        meta_path, weights_path = d / cls.FILES.meta, d / cls.FILES.weights
        if not meta_path.is_file() or not weights_path.is_file():
            raise cls.LOAD_ERROR(f"{d} needs {meta_path.name} and {weights_path.name}: {cls.LOAD_HINT}")
        meta = json.loads(meta_path.read_text())
        model = cls.from_saved_meta(meta, d)
        try:
            model.load_state_dict(torch.load(weights_path, map_location=map_location, weights_only=True))  # type: ignore[attr-defined]
        except RuntimeError as e:
            raise cls.LOAD_ERROR(f"{d} does not match the architecture it describes: {e}") from None
        return model.to(map_location).eval()  # type: ignore[attr-defined]
