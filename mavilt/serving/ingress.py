"""The ingress's checkpoint: resolved from the user config (or the environment, or the demo run), warmed in
every part before it is switched to, and fixed per request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mavilt.errors import InputError

log = logging.getLogger(__name__)


class CheckpointState:
    def __init__(self) -> None:
        self._ckpt = None
        self._error: str | None = None
        self._configured = False
        self._lock = asyncio.Lock()

    def current(self):
        """The checkpoint a new request uses; without a config update, the default one (resolved once)."""
        if self._ckpt is None and not self._configured:
            self._resolve(None)
        if self._ckpt is None:
            raise InputError(self._error or "no checkpoint")
        return self._ckpt

    def _resolve(self, configured: str | None):
        from mavilt.serving.models import resolve_checkpoint

        try:
            return resolve_checkpoint(configured)
        except Exception as e:  # noqa: BLE001 - kept, and answered as 503 until a config update mends it
            self._error = str(e)
            log.error("no checkpoint: %s", e)
            return None
        finally:
            self._configured = True

    async def switch(self, configured: str | None, parts: tuple[Any, ...]) -> None:
        """Load the new checkpoint in every part first, then switch: requests already on their way keep the
        old one (each part keeps it loaded), new ones get the new one; never a mix."""
        async with self._lock:
            ckpt = self._resolve(configured)
            if ckpt is None:
                if self._ckpt is not None:
                    log.error("config update refused, still serving %s: %s", self._ckpt.uri, self._error)
                return
            if self._ckpt is not None and ckpt.content_hash == self._ckpt.content_hash:
                return
            await asyncio.gather(*(p.load.remote(ckpt.uri) for p in parts))
            self._ckpt, self._error = ckpt, None
            log.info("serving %s (%s)", ckpt.uri, ckpt.source)


class LocalBackend:
    """The three parts in this process, behind the same HTTP API (no Ray Serve): for a laptop without Ray,
    and for the API's tests. ``serve/app.py`` is the deployment. Model calls run one at a time on a worker
    thread, so the event loop stays free (health checks answer, and ``serve.request_timeout_s`` applies)."""

    def __init__(self, serve_cfg, checkpoint: str | None = None, device: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from mavilt.serving.models import DecoderModel, LanguageModel, TokenizerModel

        self.serve_cfg = serve_cfg
        self.state = CheckpointState()
        self.state._ckpt = self.state._resolve(checkpoint)
        self.tokenizer, self.llm, self.decoder = TokenizerModel(device), LanguageModel(device), DecoderModel(device)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="mavilt-model")

    def current(self):
        return self.state.current()

    async def _one(self, fn, item):
        return (await asyncio.get_running_loop().run_in_executor(self._worker, fn, [item]))[0]

    async def encode(self, ck, image):
        return await self._one(self.tokenizer.encode, (ck.uri, image))

    async def report(self, ck, codes, request):
        return await self._one(self.llm.report, (ck.uri, codes, request))

    async def synthesize(self, ck, request):
        return await self._one(self.llm.synthesize, (ck.uri, request.text, request))

    async def decode(self, ck, codes):
        return await self._one(self.decoder.decode, (ck.uri, codes))

    async def vqa(self, ck, codes, request):
        return await self._one(self.llm.vqa, (ck.uri, codes, request))

    async def describe(self, ck):
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.llm.describe, ck.uri)
