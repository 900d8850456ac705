"""What every job entry point shares: logging, config loading, and one clear message for user errors."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from mavilt.config import Config, ConfigError, load_config
from mavilt.runs import setup_logging

log = logging.getLogger("mavilt")

# Errors a user can cause and fix: print the message alone, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def run_job(fn: Callable[[Config], Any], preset: str, overrides: list[str]) -> Any:
    setup_logging()
    try:
        cfg = load_config(preset, overrides)
        return fn(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
