"""The MAViLT Ray Serve application: ImageTokenizer (VQ-GAN encoder) -> LLM -> ImageDecoder (VQ-GAN decoder),
composed by a FastAPI ingress through DeploymentHandles.

    serve run serve/config.yaml               # after `make demo`; http://127.0.0.1:8000/ (docs at /docs)
    serve deploy serve/config.yaml            # onto a running cluster (see the README)

The preset (resources, batching, limits) comes from ``$MAVILT_SERVE_CONFIG`` (a preset name or YAML; default
tiny); the checkpoint from ``user_config.checkpoint``, else ``$MAVILT_CHECKPOINT``, else runs/demo/stage2/bundle.
Importing this module builds the application graph only: nothing loads until a replica starts.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from mavilt.config import load_config
from mavilt.serving.deploy import batch_settings, deployment_options

CONFIG_ENV = "MAVILT_SERVE_CONFIG"


class _Batched:
    """Batch size and wait from the config, set on each ``@serve.batch`` method when a replica starts."""

    def _set_batching(self, serve_cfg, *methods) -> None:
        b = batch_settings(serve_cfg)
        for m in methods:
            m.set_max_batch_size(b["max_batch_size"])
            m.set_batch_wait_timeout_s(b["batch_wait_timeout_s"])


@serve.deployment
class ImageTokenizer(_Batched):
    def __init__(self, serve_cfg):
        from mavilt.serving.models import TokenizerModel

        self.model = TokenizerModel()
        self._set_batching(serve_cfg, self.encode)

    def load(self, uri: str) -> None:
        self.model.cache.get(uri)

    @serve.batch
    async def encode(self, items: list[tuple[str, Any]]) -> list:
        return self.model.encode(items)


@serve.deployment
class LLM(_Batched):
    def __init__(self, serve_cfg):
        from mavilt.serving.models import LanguageModel

        self.model = LanguageModel()
        self._set_batching(serve_cfg, self.report, self.synthesize, self.vqa)

    def load(self, uri: str) -> None:
        self.model.cache.get(uri)

    @serve.batch
    async def report(self, items: list[tuple]) -> list[str]:
        return self.model.report(items)

    @serve.batch
    async def synthesize(self, items: list[tuple]) -> list:
        return self.model.synthesize(items)

    @serve.batch
    async def vqa(self, items: list[tuple]) -> list[dict]:
        return self.model.vqa(items)

    def describe(self, uri: str) -> dict:
        return self.model.describe(uri)

    def batch_sizes(self) -> list[int]:
        return list(self.model.batch_sizes)


@serve.deployment
class ImageDecoder(_Batched):
    def __init__(self, serve_cfg):
        from mavilt.serving.models import DecoderModel

        self.model = DecoderModel()
        self._set_batching(serve_cfg, self.decode)

    def load(self, uri: str) -> None:
        self.model.cache.get(uri)

    @serve.batch
    async def decode(self, items: list[tuple[str, Any]]) -> list:
        return self.model.decode(items)


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API (:mod:`mavilt.serving.api`); the checkpoint of each request is fixed when it arrives."""

    def __init__(self, tokenizer, llm, decoder, serve_cfg):
        from mavilt.serving.ingress import CheckpointState

        self.tokenizer, self.llm, self.decoder, self.serve_cfg = tokenizer, llm, decoder, serve_cfg
        self.state = CheckpointState()

    async def reconfigure(self, user_config: dict) -> None:
        await self.state.switch((user_config or {}).get("checkpoint"), (self.tokenizer, self.llm, self.decoder))

    def __serve_build_asgi_app__(self):
        from mavilt.serving.api import build_api

        return build_api(self)

    def current(self):
        return self.state.current()

    async def encode(self, ck, image):
        return await self.tokenizer.encode.remote((ck.uri, image))

    async def report(self, ck, codes, request):
        return await self.llm.report.remote((ck.uri, codes, request))

    async def synthesize(self, ck, request):
        return await self.llm.synthesize.remote((ck.uri, request.text, request))

    async def decode(self, ck, codes):
        return await self.decoder.decode.remote((ck.uri, codes))

    async def vqa(self, ck, codes, request):
        return await self.llm.vqa.remote((ck.uri, codes, request))

    async def describe(self, ck):
        return await self.llm.describe.remote(ck.uri)


def build(cfg, checkpoint: str | None = None) -> serve.Application:
    """The application for a config (its ``serve`` section sets every deployment's options); ``checkpoint``
    sets the ingress's ``user_config.checkpoint`` (a Serve config file's ``user_config`` replaces it)."""
    sv = cfg.serve
    part = lambda cls, name: cls.options(**deployment_options(name, sv)).bind(sv)  # noqa: E731
    ingress = Ingress.options(**deployment_options("ingress", sv), user_config={"checkpoint": checkpoint})
    return ingress.bind(part(ImageTokenizer, "tokenizer"), part(LLM, "llm"), part(ImageDecoder, "decoder"), sv)


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run serve.app:app_builder config=base set=serve.llm.max_replicas=4``: a preset and overrides."""
    overrides = [s for s in str(args.get("set", "")).split(",") if s]
    return build(load_config(args.get("config", os.environ.get(CONFIG_ENV, "tiny")), overrides), args.get("checkpoint"))


app = build(load_config(os.environ.get(CONFIG_ENV, "tiny")))
