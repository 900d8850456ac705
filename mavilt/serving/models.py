"""What each Serve deployment computes, without Ray: the checkpoint a server answers with, the three model
parts (each loading only its part of the bundle), and the batch functions ``@serve.batch`` calls.

Every call names the checkpoint it is for. The ingress resolves the checkpoint once per request and hands
that name to each part, so a request is answered by one checkpoint's tokenizer, LLM and decoder even while a
config update swaps the checkpoint; each part keeps the last two checkpoints loaded, so requests already on
their way finish on the old one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mavilt.errors import BundleError, InputError

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "MAVILT_CHECKPOINT"
DEMO_BUNDLE = ("runs", "demo", "stage2", "bundle")


@dataclass(frozen=True)
class Checkpoint:
    """A bundle a server answers with: where it is, and its identity (the bundle's content hash)."""

    uri: str
    content_hash: str
    source: str  # user_config.checkpoint | MAVILT_CHECKPOINT | the demo run
    image_size: int  # uploads are resized to it on arrival
    report_section: str = "findings"  # the section its reports are written in (stage2.report_section)

    @property
    def id(self) -> str:
        return self.content_hash[:16]


def resolve_checkpoint(configured: str | None = None, environ: Mapping | None = None) -> Checkpoint:
    """The checkpoint, in this order: ``configured`` (the deployment's ``user_config.checkpoint``: a bundle or a
    sweep's ``best.json``, a path or URI), then ``$MAVILT_CHECKPOINT``, then ``runs/demo/stage2/bundle`` of
    the checkout."""
    from mavilt.bundle import read_manifest
    from mavilt.storage import Location

    env = os.environ if environ is None else environ
    if configured:
        value, source = str(configured), "user_config.checkpoint"
    elif env.get(CHECKPOINT_ENV):
        value, source = str(env[CHECKPOINT_ENV]), CHECKPOINT_ENV
    else:
        found = [c.joinpath(*DEMO_BUNDLE) for c in _checkouts() if c.joinpath(*DEMO_BUNDLE).is_dir()]
        if not found:
            raise InputError(f"no checkpoint: set user_config.checkpoint in serve/config.yaml or {CHECKPOINT_ENV} "
                             "to a model bundle (runs/<name>/stage2/bundle) or a sweep's best.json, or run "
                             "`make demo` for runs/demo/stage2/bundle")
        value, source = str(found[0]), "the demo run"
    where = Location.of(value)
    if where.name == "best.json":
        if not where.is_file():
            raise InputError(f"{source} {value}: no such file; a stage-2 sweep writes results/best.json")
        best = json.loads(where.read_text())
        if not best.get("checkpoint"):
            raise InputError(f"{source} {value} names no checkpoint; only a stage-2 sweep's best.json names a bundle")
        where = Location.of(best["checkpoint"])
    try:
        _, manifest = read_manifest(where)
    except BundleError as e:
        hint = " (run `make demo` first)" if source == "the demo run" else ""
        raise InputError(f"{source}: {e}{hint}") from None
    section = ((manifest.get("config") or {}).get("stage2") or {}).get("report_section") or "findings"
    return Checkpoint(uri=where.uri, content_hash=str(manifest.get("content_hash") or where.uri), source=source,
                      image_size=int(manifest["image_size"]), report_section=str(section))


def _checkouts() -> list[Path]:
    """The checkout this code runs from, and the one mavilt is installed from in editable mode: under
    ``serve deploy`` the code runs from Ray's copy of the working directory, which has no runs/ folder."""
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    from mavilt.paths import CHECKOUT_DIR

    out = [CHECKOUT_DIR] if CHECKOUT_DIR is not None else []
    try:
        info = json.loads(metadata.distribution("mavilt").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, json.JSONDecodeError):
        info = {}
    if info.get("dir_info", {}).get("editable") and str(info.get("url", "")).startswith("file://"):
        out.append(Path(unquote(urlparse(info["url"]).path)))
    return out


class PartCache:
    """One bundle part per checkpoint, loaded on first use; the two most recent are kept."""

    def __init__(self, parts: Sequence[str], device: str | None = None, keep: int = 2):
        self.parts, self.device, self.keep = tuple(parts), device, keep
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str):
        from mavilt.bundle import load_bundle

        with self._lock:
            if uri in self._loaded:
                self._loaded.move_to_end(uri)
                return self._loaded[uri]
            t0 = time.perf_counter()
            bundle = load_bundle(uri, device=self.device, parts=self.parts)
            log.info("loaded %s of the bundle in %.1f s", "+".join(self.parts), time.perf_counter() - t0)
            self._loaded[uri] = bundle
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return bundle

    def loaded(self) -> list[str]:
        return list(self._loaded)


def _grouped(items: Sequence[tuple], key: Callable[[tuple], Any], run: Callable[[list[tuple]], list]) -> list:
    """``run`` once per group of items with an equal ``key`` (a checkpoint and its generation settings), the
    results back in the items' order."""
    out: list[Any] = [None] * len(items)
    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    for idx in groups.values():
        for i, r in zip(idx, run([items[i] for i in idx])):
            out[i] = r
    return out


class TokenizerModel:
    """Images (float [H, W] in [0, 1]) -> VQ-GAN codes."""

    def __init__(self, device: str | None = None):
        from mavilt.bundle import IMAGE_ENCODER

        self.cache = PartCache([IMAGE_ENCODER], device)

    def encode(self, items: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        def run(group):
            b = self.cache.get(group[0][0])
            return [c.numpy() for c in b.encode_images([img for _, img in group])]

        return _grouped(items, lambda it: it[0], run)


class DecoderModel:
    """VQ-GAN codes -> images (float [H, W] in [0, 1])."""

    def __init__(self, device: str | None = None):
        from mavilt.bundle import IMAGE_DECODER

        self.cache = PartCache([IMAGE_DECODER], device)

    def decode(self, items: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        import torch

        def run(group):
            b = self.cache.get(group[0][0])
            return [x[0].numpy() for x in b.decode_codes(torch.as_tensor(np.stack([c for _, c in group])))]

        return _grouped(items, lambda it: it[0], run)


class LanguageModel:
    """The LLM's three calls; each item is ``(checkpoint uri, input, request)``, grouped by checkpoint and the
    request's generation settings so no request runs with another's."""

    def __init__(self, device: str | None = None):
        from mavilt.bundle import LANGUAGE_MODEL

        self.cache = PartCache([LANGUAGE_MODEL], device)
        self.batch_sizes: list[int] = []  # observed batch sizes (the tests and /v1/model read them)

    def _key(self, it: tuple) -> tuple:
        return it[0], it[2].settings_key()

    def report(self, items: Sequence[tuple[str, np.ndarray, Any]]) -> list[str]:
        import torch

        self.batch_sizes.append(len(items))

        def run(group):
            b = self.cache.get(group[0][0])
            codes = torch.as_tensor(np.stack([c for _, c, _ in group]).astype(np.int64))
            return b.report_from_codes(codes, **group[0][2].settings())

        return _grouped(items, self._key, run)

    def synthesize(self, items: Sequence[tuple[str, str, Any]]) -> list[np.ndarray]:
        """-> codes [num_images, N] per item."""
        self.batch_sizes.append(len(items))

        def run(group):
            b = self.cache.get(group[0][0])
            texts = [t for _, t, r in group for _ in range(r.num_images)]
            seeds = [s for _, _, r in group for s in r.row_seeds(b.config.generate.seed)]
            codes = b.synthesize_codes(texts, seeds, **group[0][2].settings()).numpy()
            out, at = [], 0
            for _, _, r in group:
                out.append(codes[at : at + r.num_images])
                at += r.num_images
            return out

        return _grouped(items, self._key, run)

    def vqa(self, items: Sequence[tuple[str, np.ndarray, Any]]) -> list[dict[str, Any]]:
        import torch

        self.batch_sizes.append(len(items))

        def run(group):
            b = self.cache.get(group[0][0])
            codes = torch.as_tensor(np.stack([c for _, c, _ in group]).astype(np.int64))
            return b.vqa_from_codes(codes, [r.question for _, _, r in group],
                                    [list(r.choices) if r.choices else None for _, _, r in group])

        return _grouped(items, lambda it: it[0], run)

    def describe(self, uri: str) -> dict[str, Any]:
        b = self.cache.get(uri)
        v = b.vocab
        return {"preset": b.config.preset, "image_size": b.image_size, "code_version": b.manifest.get("code_version"),
                "vocab": {"text": v.text_vocab_size, "codebook": v.codebook_size, "tokens_per_image": v.tokens_per_image,
                          "total": v.size},
                "generate": {k: getattr(b.config.generate, k) for k in ("max_new_tokens", "num_beams", "cfg_scale")},
                "report_section": b.config.stage2.report_section}
