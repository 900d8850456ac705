"""Requests to a bundle, checked in one place (the CLI and the server): values kept, bad ones refused by name,
per-request generation settings."""

from __future__ import annotations

import pytest

from mavilt.config import load_config
from mavilt.errors import ConfigError
from mavilt.serving.requests import (ReportRequest, RequestError, RequestLimits, SynthesizeRequest, VQARequest,
                                     limits_of, parse_choices)


def test_good_requests_keep_their_values_and_leave_the_rest_to_the_bundle():
    r = ReportRequest.parse({"section": "Impression", "max_new_tokens": "32", "num_beams": 2, "seed": 7})
    assert (r.section, r.max_new_tokens, r.num_beams, r.seed, r.top_p) == ("impression", 32, 2, 7, None)
    assert r.settings() == {"section": "impression", "max_new_tokens": 32, "num_beams": 2, "seed": 7}
    s = SynthesizeRequest.parse({"text": "  Small left pleural effusion. ", "cfg_scale": 3, "format": "DICOM"})
    assert (s.text, s.cfg_scale, s.format, s.num_images) == ("Small left pleural effusion.", 3.0, "dicom", 1)
    assert s.settings() == {"cfg_scale": 3.0}  # text, format and count are the request's, not decoding settings
    q = VQARequest.parse({"question": "Is there a pleural effusion?", "choices": "yes, no"})
    assert q.choices == ("yes", "no")
    assert VQARequest.parse({"question": "Which side?", "choices": None}).choices is None


def test_settings_keys_group_equal_settings_only():
    a, b = ReportRequest.parse({"num_beams": 2, "seed": 1}), ReportRequest.parse({"seed": 1, "num_beams": "2"})
    c = ReportRequest.parse({"num_beams": 3, "seed": 1})
    assert a.settings_key() == b.settings_key() != c.settings_key()
    assert ReportRequest.parse({}).settings_key() == ()


@pytest.mark.parametrize("cls,data,field,message", [
    (ReportRequest, {"section": "history"}, "section", "section must be one of findings, impression, both"),
    (ReportRequest, {"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be in [1, 256], got 0"),
    (ReportRequest, {"max_new_tokens": 10_000}, "max_new_tokens", "max_new_tokens must be in [1, 256]"),
    (ReportRequest, {"max_new_tokens": 2.5}, "max_new_tokens", "must be an integer"),
    (ReportRequest, {"max_new_tokens": "many"}, "max_new_tokens", "must be an integer in [1, 256], got 'many'"),
    (ReportRequest, {"num_beams": True}, "num_beams", "must be an integer"),
    (ReportRequest, {"temperature": 0}, "temperature", "temperature must be in (0, 10]"),
    (ReportRequest, {"top_p": float("nan")}, "top_p", "top_p must be in (0, 1]"),
    (ReportRequest, {"do_sample": "maybe"}, "do_sample", "do_sample must be true or false"),
    (ReportRequest, {"do_sample": True, "num_beams": 3}, "num_beams", "cannot be combined"),
    (ReportRequest, {"beams": 3}, "beams", "unknown field beams; this request takes section, max_new_tokens"),
    (SynthesizeRequest, {}, "text", "text is missing"),
    (SynthesizeRequest, {"text": "   "}, "text", "text is empty"),
    (SynthesizeRequest, {"text": "x" * 4001}, "text", "text is 4001 characters long; the limit is 4000"),
    (SynthesizeRequest, {"text": 12}, "text", "text must be a string, got int"),
    (SynthesizeRequest, {"text": "ok", "cfg_scale": 0.5}, "cfg_scale", "cfg_scale must be in [1, 20]"),
    (SynthesizeRequest, {"text": "ok", "num_images": 5}, "num_images", "num_images must be in [1, 4]"),
    (SynthesizeRequest, {"text": "ok", "format": "jpeg"}, "format", "format must be one of png, dicom"),
    (VQARequest, {"choices": ["yes", "no"]}, "question", "question is missing"),
    (VQARequest, {"question": "q" * 501}, "question", "the limit is 500"),
    (VQARequest, {"question": "Effusion?", "choices": ["yes"]}, "choices", "two or more distinct answers"),
    (VQARequest, {"question": "Effusion?", "choices": ["yes", "yes"]}, "choices", "two or more distinct answers"),
    (VQARequest, {"question": "Effusion?", "choices": [1, 2]}, "choices", "a list of strings"),
    (VQARequest, {"question": "Effusion?", "choices": {"a": 1}}, "choices", "a list of strings"),
])
def test_bad_values_are_refused_naming_the_field(cls, data, field, message):
    with pytest.raises(RequestError) as e:
        cls.parse(data)
    assert message in str(e.value)
    assert e.value.field == field


def test_a_request_that_is_not_an_object_is_refused():
    with pytest.raises(RequestError, match="must be a JSON object with the fields text, seed"):
        SynthesizeRequest.parse(["text"])  # type: ignore[arg-type]


def test_limits_come_from_the_serve_section():
    cfg = load_config("tiny", ["serve.max_new_tokens=16", "serve.max_question_chars=20"])
    limits = limits_of(cfg.serve)
    assert ReportRequest.parse({"max_new_tokens": 16}, limits).max_new_tokens == 16
    with pytest.raises(RequestError, match=r"\[1, 16\]"):
        ReportRequest.parse({"max_new_tokens": 17}, limits)
    with pytest.raises(RequestError, match="the limit is 20"):
        VQARequest.parse({"question": "q" * 21}, limits)
    assert len(parse_choices([f"c{i}" for i in range(16)], RequestLimits())) == 16
    with pytest.raises(RequestError, match="the limit is 16"):
        parse_choices([f"c{i}" for i in range(17)])


def test_the_serve_section_is_checked():
    with pytest.raises(ConfigError, match="serve.llm: need 0 <= min_replicas <= max_replicas"):
        load_config("tiny", ["serve.llm.min_replicas=3", "serve.llm.max_replicas=2"])
    with pytest.raises(ConfigError, match="serve.max_batch_size must be >= 1"):
        load_config("tiny", ["serve.max_batch_size=0"])
    with pytest.raises(ConfigError, match="unknown config key 'serve.llm.cpus'"):
        load_config("tiny", ["serve.llm.cpus=1"])
