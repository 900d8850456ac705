"""Configs written by older code (saved with checkpoints and runs), brought to the current config version."""

from __future__ import annotations

from typing import Any

from mavilt.errors import ConfigError

# Keys version 1 accepted although nothing read them (or read another section's): dropped when read back.
_REMOVED_IN_2: dict[str, tuple[str, ...]] = {
    "pretrain_text": ("lambda_reg", "task_weights", "report_section", "condition_dropout"),
    "stage1": ("heldout_fraction",),
    "stage2": ("heldout_fraction",),
}
_SECTIONS_REMOVED_IN_2 = ("tune", "serve")


def migrate(data: dict[str, Any], source: str, current: int, unversioned: int = 1) -> dict[str, Any]:
    """A saved or user config mapping, brought to version ``current`` (:data:`mavilt.config.CONFIG_VERSION`). A
    mapping without ``config_version`` is of version ``unversioned``: 1 for configs saved with checkpoints (the
    first code saved none), the current version for presets and YAML files people write."""
    data = dict(data)
    version = data.pop("config_version", unversioned)
    if not isinstance(version, int) or version > current:
        raise ConfigError(f"{source} has config_version {version!r}; this code reads versions 1 to {current}: "
                          "update MAViLT, or write the config again with this version")
    if version == 1:
        for s in _SECTIONS_REMOVED_IN_2:
            data.pop(s, None)
        for s, keys in _REMOVED_IN_2.items():
            if isinstance(data.get(s), dict):
                data[s] = {k: v for k, v in data[s].items() if k not in keys}
    return data
