"""What a caller may ask of a bundle, checked in one place: the CLI and the server build the same requests.

Each request is a frozen dataclass built by its ``parse`` classmethod from loosely typed input (a JSON body,
form fields, CLI arguments): unknown fields, wrong types and values out of range raise :class:`RequestError`
naming the field and what is allowed. Generation settings travel with each request (``settings``), so a batch
may mix them: the model groups rows by their settings and never applies one request's to another's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from mavilt.errors import MavilError

SECTIONS = ("findings", "impression", "both")
IMAGE_FORMATS = ("png", "dicom")


class RequestError(MavilError, ValueError):
    """A request that cannot be answered as given (the server's 422, the CLI's exit status 2)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    """The bounds every request is checked against (``serve`` section of the config)."""

    max_text_chars: int = 4000
    max_question_chars: int = 500
    max_choices: int = 16
    max_choice_chars: int = 64
    max_new_tokens: int = 256
    max_beams: int = 8
    max_cfg_scale: float = 20.0
    max_images: int = 4  # synthesize: images per request


def limits_of(serve) -> RequestLimits:
    """The limits a config's ``serve`` section sets."""
    return RequestLimits(max_text_chars=serve.max_text_chars, max_question_chars=serve.max_question_chars,
                         max_new_tokens=serve.max_new_tokens, max_beams=serve.max_beams, max_images=serve.max_images)


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {type(value).__name__}", name)
    try:
        as_float = float(value)
    except ValueError:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {str(value)[:40]!r}", name) from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {str(value)[:40]}", name)
    n = int(as_float)
    if not lo <= n <= hi:
        raise RequestError(f"{name} must be in [{lo}, {hi}], got {n}", name)
    return n


def _float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {type(value).__name__}", name)
    try:
        x = float(value)
    except ValueError:
        raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {str(value)[:40]!r}", name) from None
    if not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise RequestError(f"{name} must be in {bound}, got {x:g}", name)
    return x


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(f"{name} must be true or false, got {str(value)[:40]!r}", name)


def _text(name: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}", name)
    text = value.strip()
    if not text:
        raise RequestError(f"{name} is empty", name)
    if len(text) > limit:
        raise RequestError(f"{name} is {len(text)} characters long; the limit is {limit}", name)
    return text


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise RequestError(f"{name} must be one of {', '.join(allowed)}, got {str(value)[:40]!r}", name)
    return value.strip().lower()


class _Request:
    """Shared parsing: the known fields, each checked by the subclass's ``_check``; None means "the bundle's
    default"."""

    FIELDS: ClassVar[tuple[str, ...]]

    @classmethod
    def parse(cls, data: Mapping[str, Any], limits: RequestLimits = RequestLimits()):
        if not isinstance(data, Mapping):
            raise RequestError(f"the request must be a JSON object with the fields {', '.join(cls.FIELDS)}")
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))[:200]}; "
                               f"this request takes {', '.join(cls.FIELDS)}", str(unknown[0]))
        values = {k: v for k, v in data.items() if v is not None}
        return cls(**cls._check(values, limits))  # type: ignore[call-arg]

    @classmethod
    def _check(cls, values: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The generation overrides this request sets (``Bundle`` keyword arguments), for grouping a batch."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k in self.SETTINGS and v is not None}

    SETTINGS: ClassVar[tuple[str, ...]] = ()

    def settings_key(self) -> tuple:
        return tuple(sorted(self.settings().items()))


@dataclass(frozen=True)
class ReportRequest(_Request):
    """CXR -> report: the section and the decoding settings (each None: the bundle's ``generate`` value)."""

    section: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("section", "max_new_tokens", "num_beams", "do_sample", "temperature",
                                         "top_p", "top_k", "seed")
    SETTINGS: ClassVar[tuple[str, ...]] = FIELDS

    @classmethod
    def _check(cls, v: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "section" in v:
            out["section"] = _choice("section", v["section"], SECTIONS)
        if "max_new_tokens" in v:
            out["max_new_tokens"] = _int("max_new_tokens", v["max_new_tokens"], 1, limits.max_new_tokens)
        if "num_beams" in v:
            out["num_beams"] = _int("num_beams", v["num_beams"], 1, limits.max_beams)
        if "do_sample" in v:
            out["do_sample"] = _bool("do_sample", v["do_sample"])
        if "temperature" in v:
            out["temperature"] = _float("temperature", v["temperature"], 0.0, 10.0, lo_open=True)
        if "top_p" in v:
            out["top_p"] = _float("top_p", v["top_p"], 0.0, 1.0, lo_open=True)
        if "top_k" in v:
            out["top_k"] = _int("top_k", v["top_k"], 0, 100_000)
        if "seed" in v:
            out["seed"] = _int("seed", v["seed"], 0, 2**31 - 1)
        if out.get("do_sample") and out.get("num_beams", 1) > 1:
            raise RequestError("do_sample and num_beams > 1 cannot be combined: sample (num_beams=1) or search "
                               "beams (do_sample=false)", "num_beams")
        return out


@dataclass(frozen=True)
class SynthesizeRequest(_Request):
    """Report text -> CXR(s)."""

    text: str = ""
    seed: int | None = None
    cfg_scale: float | None = None
    image_temperature: float | None = None
    top_k: int | None = None
    num_images: int = 1
    format: str = "png"

    FIELDS: ClassVar[tuple[str, ...]] = ("text", "seed", "cfg_scale", "image_temperature", "top_k", "num_images",
                                         "format")
    # The seed is not a batch-wide setting: each image samples from its own stream (``row_seeds``), so
    # requests with different seeds share a batch and a seed gives the same image alone or batched.
    SETTINGS: ClassVar[tuple[str, ...]] = ("cfg_scale", "image_temperature", "top_k")

    def row_seeds(self, default: int) -> list[int]:
        """The seed of each of this request's images: its seed (or ``default``, the bundle's) + the image's index."""
        base = default if self.seed is None else self.seed
        return [base + j for j in range(self.num_images)]

    @classmethod
    def _check(cls, v: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
        if "text" not in v:
            raise RequestError("text is missing: give the report to draw, e.g. \"Small left pleural effusion.\"",
                               "text")
        out: dict[str, Any] = {"text": _text("text", v["text"], limits.max_text_chars)}
        if "seed" in v:
            out["seed"] = _int("seed", v["seed"], 0, 2**31 - 1)
        if "cfg_scale" in v:
            out["cfg_scale"] = _float("cfg_scale", v["cfg_scale"], 1.0, limits.max_cfg_scale)
        if "image_temperature" in v:
            out["image_temperature"] = _float("image_temperature", v["image_temperature"], 0.0, 10.0)
        if "top_k" in v:
            out["top_k"] = _int("top_k", v["top_k"], 0, 100_000)
        if "num_images" in v:
            out["num_images"] = _int("num_images", v["num_images"], 1, limits.max_images)
        if "format" in v:
            out["format"] = _choice("format", v["format"], IMAGE_FORMATS)
        return out


@dataclass(frozen=True)
class VQARequest(_Request):
    """CXR + question -> answer; with ``choices`` the answer set is scored and its probabilities returned."""

    question: str = ""
    choices: tuple[str, ...] | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("question", "choices")

    @classmethod
    def _check(cls, v: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
        if "question" not in v:
            raise RequestError("question is missing, e.g. \"Is there a pleural effusion?\"", "question")
        out: dict[str, Any] = {"question": _text("question", v["question"], limits.max_question_chars)}
        if "choices" in v:
            out["choices"] = parse_choices(v["choices"], limits)
        return out


def parse_choices(value: Any, limits: RequestLimits = RequestLimits()) -> tuple[str, ...]:
    """An answer set: a list of strings, or one comma-separated string (forms, the CLI's ``--choices``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(c, str) for c in items):
        raise RequestError("choices must be a list of strings (or one comma-separated string), e.g. [\"yes\", \"no\"]",
                           "choices")
    items = [c.strip() for c in items if c.strip()]
    if len(items) < 2 or len(set(items)) != len(items):
        raise RequestError(f"choices must be two or more distinct answers, got {items[:limits.max_choices]}", "choices")
    if len(items) > limits.max_choices:
        raise RequestError(f"choices has {len(items)} answers; the limit is {limits.max_choices}", "choices")
    long = [c for c in items if len(c) > limits.max_choice_chars]
    if long:
        raise RequestError(f"an answer in choices is {len(long[0])} characters long; the limit is "
                           f"{limits.max_choice_chars}", "choices")
    return tuple(items)
