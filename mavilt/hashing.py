"""The two hashes the project uses, each defined once.

- :func:`config_hash`: of JSON-able parts (config sections, paths, upstream hashes): the pipeline's skip
  logic and each job's ``config_hash``.
- :func:`content_hash`: of a folder's files (names and bytes): the code cache's key, so the same weights
  give the same cache wherever they are stored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

HASH_CHARS = 16


def config_hash(parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_CHARS]


def content_hash(directory: str | Path, recursive: bool = False) -> str:
    """Of the folder's files (``recursive``: of every file below it, by relative path)."""
    d = Path(directory)
    h = hashlib.sha256()
    files = (p for p in (d.rglob("*") if recursive else d.iterdir()) if p.is_file())
    for name in sorted(p.relative_to(d).as_posix() for p in files):
        h.update(name.encode())
        with open(d / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:HASH_CHARS]
