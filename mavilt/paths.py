"""Where the project's own folders are: presets, DeepSpeed configs and the local cache.

Presets ship inside the package (``mavilt/configs``; the checkout's top-level ``configs`` links to it), so an
installed package finds them as well as a checkout. The cache (``.cache/`` of the checkout, filled by
``make setup``) holds the IU X-ray report texts; ``MAVILT_CACHE`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
# A checkout has pyproject.toml beside the package; an installed package has none.
CHECKOUT_DIR: Path | None = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None


def cache_dir() -> Path:
    """``$MAVILT_CACHE``, else the checkout's ``.cache/``, else ``~/.cache/mavilt``."""
    if os.environ.get("MAVILT_CACHE"):
        return Path(os.environ["MAVILT_CACHE"]).expanduser()
    if CHECKOUT_DIR is not None:
        return CHECKOUT_DIR / ".cache"
    return Path.home() / ".cache" / "mavilt"


def iu_reports_dir() -> Path:
    """The OpenI report XMLs `make setup` extracts (text pretraining and held-out perplexity)."""
    return cache_dir() / "iu_xray" / "ecgen-radiology"


def resolve_project_file(path: str | Path) -> Path:
    """A path as given when it exists; else, when relative, the same path inside the package (presets name
    ``configs/deepspeed/zero2.json``, which must work from any working directory and when installed)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts
    if parts and parts[0] == "configs":
        return CONFIG_DIR.joinpath(*parts[1:])
    return p
