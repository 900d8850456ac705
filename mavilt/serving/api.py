"""The HTTP API and the web page, as a FastAPI app over a :class:`Backend` (the ingress deployment).

Every bad input gets a 4xx with ``{"error": ..., "field": ...}`` that says what was wrong: 400 (unreadable
image, invalid JSON), 401 (API key), 413 (upload too large, checked on ``Content-Length`` and again while the
body streams in), 415 (a content type or an image format the API does not take), 422 (a value out of range).
503 with ``Retry-After`` when the queues are full, 504 when a request outlives ``serve.request_timeout_s``.
Nothing from an uploaded file (its name, a DICOM header) is logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from importlib import resources
from typing import Any, Protocol

from fastapi import Request  # at module level: the routes' annotations are resolved from here

from mavilt.serving.requests import ReportRequest, RequestError, SynthesizeRequest, VQARequest

log = logging.getLogger(__name__)

API_KEY_ENV = "MAVILT_API_KEY"
API_KEY_HEADER = "X-API-Key"
RAW_IMAGE_TYPES = ("application/octet-stream", "image/png", "image/jpeg", "application/dicom")


class Backend(Protocol):
    """What the routes call (the ingress deployment implements it with DeploymentHandles)."""

    serve_cfg: Any  # the config's serve section

    def current(self) -> Any: ...  # the Checkpoint every part of one request uses
    async def encode(self, ckpt: Any, image) -> Any: ...
    async def report(self, ckpt: Any, codes, request: ReportRequest) -> str: ...
    async def synthesize(self, ckpt: Any, request: SynthesizeRequest) -> Any: ...
    async def decode(self, ckpt: Any, codes) -> Any: ...
    async def vqa(self, ckpt: Any, codes, request: VQARequest) -> dict[str, Any]: ...
    async def describe(self, ckpt: Any) -> dict[str, Any]: ...


class HTTPFailure(Exception):
    """An answer other than 200, with its JSON error."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def _api_key(serve_cfg) -> str | None:
    return os.environ.get(API_KEY_ENV) or serve_cfg.api_key or None


def build_api(backend: Backend):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    cfg = backend.serve_cfg
    app = FastAPI(title="MAViLT", version="1",
                  description="Chest X-ray -> report, report -> chest X-ray, visual question answering. Images: PNG, "
                              "JPEG or DICOM (recognised by content), as multipart field `image` or the raw body.")

    def error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)

    @app.exception_handler(HTTPFailure)
    async def _failure(_request, exc: HTTPFailure):
        return error(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestError)
    async def _bad_value(_request, exc: RequestError):
        return error(422, str(exc), exc.field)

    @app.exception_handler(404)
    async def _not_found(request, _exc):
        return error(404, f"no route {request.method} {request.url.path}; see /docs")

    @app.exception_handler(405)
    async def _wrong_method(request, _exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}; see /docs")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        # The API key guards the API; the page and the health check stay open (the page asks for the key).
        key = _api_key(cfg)
        if key and request.url.path.startswith("/v1/"):
            sent = request.headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(sent.encode(), key.encode()):
                return error(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header")
        try:
            return await asyncio.wait_for(call_next(request), timeout=cfg.request_timeout_s)
        except asyncio.TimeoutError:
            return error(504, f"the request took longer than {cfg.request_timeout_s:g} s (serve.request_timeout_s)")

    async def call(awaitable):
        """A model call; a full queue (Serve's back-pressure) becomes 503 with a retry hint."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await awaitable
        except BackPressureError:
            raise HTTPFailure(503, "the server is at capacity (serve.max_queued_requests); retry shortly",
                              headers={"Retry-After": "1"}) from None
        except DeploymentUnavailableError:
            raise HTTPFailure(503, "the model is not available yet; retry shortly", headers={"Retry-After": "5"}) from None

    def checkpoint():
        try:
            return backend.current()
        except Exception as e:  # noqa: BLE001 - a missing checkpoint is the operator's to fix; say what
            raise HTTPFailure(503, f"no model loaded: {e}", headers={"Retry-After": "10"}) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("mavilt.serving").joinpath("page.html").read_text())

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz():
        try:
            ck = backend.current()
        except Exception as e:  # noqa: BLE001
            return error(503, f"no model: {e}")
        return {"status": "ok", "checkpoint": ck.id}

    @app.get("/v1/model", summary="The checkpoint served, its preset, vocabulary and batching settings")
    async def model():
        ck = checkpoint()
        info = await call(backend.describe(ck))
        return {"checkpoint": {"uri": ck.uri, "id": ck.id, "source": ck.source}, **info,
                "batching": {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                             "max_queued_requests": cfg.max_queued_requests}}

    @app.post("/v1/report", summary="Chest X-ray -> report and its 14 CheXpert labels",
              openapi_extra=_upload_schema(ReportRequest.FIELDS))
    async def report(request: Request):
        from mavilt.data.labeler import label_report

        t0 = time.perf_counter()
        data, fields = await read_upload(request, cfg)
        req = ReportRequest.parse(fields, _limits(cfg))
        ck = checkpoint()
        if req.section and req.section != ck.report_section:
            raise HTTPFailure(422, f"this model was trained to write the {ck.report_section} section, never the "
                                   f"{req.section} section: ask for section={ck.report_section} or leave it out", "section")
        codes = await call(backend.encode(ck, decode_image(data, ck.image_size)))
        t1 = time.perf_counter()
        text = await call(backend.report(ck, codes, req))
        t2 = time.perf_counter()
        return {"report": text, "labels": label_report(text), "checkpoint": ck.id,
                "timing": {"encode_s": round(t1 - t0, 4), "generate_s": round(t2 - t1, 4),
                           "total_s": round(time.perf_counter() - t0, 4)}}

    @app.post("/v1/synthesize", summary="Report text -> chest X-ray (PNG, or DICOM marked derived)",
              openapi_extra=_json_schema(SynthesizeRequest.FIELDS, ["text"]))
    async def synthesize(request: Request):
        from mavilt.serving.outputs import image_response

        req = SynthesizeRequest.parse(await read_json(request, cfg), _limits(cfg))
        ck = checkpoint()
        codes = await call(backend.synthesize(ck, req))
        images = await asyncio.gather(*(call(backend.decode(ck, c)) for c in codes))
        body, media_type = image_response(images, req.format)
        return Response(body, media_type=media_type, headers={"X-Checkpoint": ck.id})

    @app.post("/v1/vqa", summary="Chest X-ray + question -> answer (and probabilities over an answer set)",
              openapi_extra=_upload_schema(VQARequest.FIELDS, ["question"]))
    async def vqa(request: Request):
        data, fields = await read_upload(request, cfg)
        req = VQARequest.parse(fields, _limits(cfg))
        ck = checkpoint()
        codes = await call(backend.encode(ck, decode_image(data, ck.image_size)))
        out = await call(backend.vqa(ck, codes, req))
        return {"question": req.question, "answer": out["answer"], "probabilities": out.get("probabilities"),
                "checkpoint": ck.id}

    return app


def _limits(cfg):
    from mavilt.serving.requests import limits_of

    return limits_of(cfg)


async def read_body(request, cfg) -> bytes:
    """The body, refused with 413 once it passes ``serve.max_upload_mb`` (by its declared length first, then
    while it streams in), so an oversized upload is never held whole."""
    limit = int(cfg.max_upload_mb * 2**20)
    declared = request.headers.get("content-length")
    too_big = HTTPFailure(413, f"the upload is larger than {cfg.max_upload_mb:g} MB (serve.max_upload_mb)")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise HTTPFailure(400, "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request, cfg) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPFailure(415, f"send JSON (Content-Type: application/json), not {ctype or 'no content type'}")
    body = await read_body(request, cfg)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPFailure(400, f"the body is not valid JSON: {getattr(e, 'msg', 'not UTF-8')}") from None
    if not isinstance(data, dict):
        raise HTTPFailure(422, "the JSON body must be an object, e.g. {\"text\": \"Small left pleural effusion.\"}")
    return data


async def read_upload(request, cfg):
    """(the image's bytes, the other fields): a multipart form with the file in ``image``, or the raw image as
    the body with the fields in the query string."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, cfg)
    if ctype == "multipart/form-data":
        replay = Request(request.scope, receive=_replay(body))
        try:
            form = await replay.form(max_files=1, max_fields=32)
        except Exception:  # noqa: BLE001 - python-multipart's message names the part, never a file's contents
            raise HTTPFailure(400, "the multipart form could not be parsed (send the file as field 'image')") from None
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPFailure(422, "the form has no file in the field 'image'", "image")
        data = await upload.read()
        fields = {k: v for k, v in form.multi_items() if k != "image"}
        if any(isinstance(v, UploadFile) for v in fields.values()):
            raise HTTPFailure(422, "only the field 'image' may hold a file")
    elif ctype in RAW_IMAGE_TYPES:
        data, fields = body, dict(request.query_params)
    else:
        raise HTTPFailure(415, f"send the image as multipart/form-data (field 'image') or as the raw body "
                               f"({', '.join(RAW_IMAGE_TYPES)}), not {ctype or 'no content type'}")
    if "choices" in fields and isinstance(fields["choices"], str) and fields["choices"].strip().startswith("["):
        try:
            fields["choices"] = json.loads(fields["choices"])
        except json.JSONDecodeError:
            raise HTTPFailure(422, "choices is not a valid JSON list (or send it comma-separated)", "choices") from None
    return data, fields


def decode_image(data: bytes, image_size: int):
    """The upload as float [H, W] in [0, 1] at the bundle's size; a fixed reason (nothing from the file) when
    it cannot be read."""
    from mavilt.data.dicom import read_image_bytes
    from mavilt.data.images import REASON_UNKNOWN_FORMAT, SkipRecord

    try:
        pixels, _view = read_image_bytes(data, image_size)
    except SkipRecord as e:
        status = 415 if e.reason == REASON_UNKNOWN_FORMAT else 400
        raise HTTPFailure(status, f"the image could not be read: {e.reason}", "image") from None
    return pixels


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _upload_schema(fields: tuple[str, ...], required: list[str] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"image": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"}}
    props.update({f: {"type": "string"} for f in fields})
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", *(required or [])],
                                           "properties": props}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _json_schema(fields: tuple[str, ...], required: list[str]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": {f: {} for f in fields}}}}}}
