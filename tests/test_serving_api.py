"""The HTTP API over the real model parts in this process (no Ray Serve): every endpoint, every bad input as a
4xx with a JSON error that names the problem, no patient identifier echoed, the API key, the upload limit."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from bundle_factory import build_tiny_bundle
from fixtures_sources import PHI_NEEDLES, quadrants, write_dicom
from PIL import Image

from mavilt.config import load_config
from mavilt.data.labels import OBSERVATIONS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    buf = io.BytesIO()
    Image.fromarray(quadrants(48, 40, 10, 250, 130, dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    dcm = write_dicom(root / "Doe^Jane.dcm", quadrants(64, 64, bg=1000, hi=60000, mid=30000)).read_bytes()
    assert b"Doe^Jane" in dcm
    return {"bundle": build_tiny_bundle(root / "bundle"), "png": png, "dcm": dcm,
            "ct": write_dicom(root / "ct.dcm", quadrants(64, 64, 0, 9, 5), modality="CT").read_bytes(),
            "knee": write_dicom(root / "knee.dcm", quadrants(64, 64, 0, 9, 5), body_part="KNEE").read_bytes(),
            "nopix": write_dicom(root / "nopix.dcm", None).read_bytes()}


def _client(bundle, overrides=()):
    from fastapi.testclient import TestClient

    from mavilt.serving.api import build_api
    from mavilt.serving.ingress import LocalBackend

    cfg = load_config("tiny", list(overrides))
    return TestClient(build_api(LocalBackend(cfg.serve, str(bundle), device="cpu")))


@pytest.fixture(scope="module")
def client(files):
    return _client(files["bundle"], ["serve.max_upload_mb=0.5"])


def test_report_from_a_png_and_a_dicom_without_phi(client, files, caplog):
    caplog.set_level(logging.DEBUG)
    for name, ctype in (("png", "image/png"), ("dcm", "application/dicom")):
        # The upload's file name is a patient's: it must not come back.
        r = client.post("/v1/report", files={"image": ("Doe^Jane.dcm", files[name], ctype)},
                        data={"max_new_tokens": "6"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["report"], str) and set(body["labels"]) == set(OBSERVATIONS)
        assert body["timing"]["total_s"] >= body["timing"]["generate_s"] >= 0
        for needle in PHI_NEEDLES:
            assert needle.lower() not in (r.text + caplog.text).lower(), needle
    # The raw body with the options in the query string gives the same report.
    raw = client.post("/v1/report?max_new_tokens=6", content=files["png"],
                      headers={"Content-Type": "application/octet-stream"})
    form = client.post("/v1/report", files={"image": ("x", files["png"])}, data={"max_new_tokens": "6"})
    assert raw.status_code == 200 and raw.json()["report"] == form.json()["report"]


def test_synthesize_png_and_dicom_marked_derived(client, files):
    r = client.post("/v1/synthesize", json={"text": "Small left pleural effusion.", "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    again = client.post("/v1/synthesize", json={"text": "Small left pleural effusion.", "seed": 3})
    assert again.content == r.content  # a seed fixes the image
    d = client.post("/v1/synthesize", json={"text": "Small left pleural effusion.", "format": "dicom"})
    assert d.status_code == 200 and d.headers["content-type"] == "application/dicom"
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(d.content))
    assert list(ds.ImageType)[:1] == ["DERIVED"] and ds.ConversionType == "SYN"
    assert "NOT FOR DIAGNOSIS" in ds.ImageComments and ds.pixel_array.shape == (32, 32)
    many = client.post("/v1/synthesize", json={"text": "Cardiomegaly.", "num_images": 2})
    assert many.status_code == 200 and len(many.json()["images"]) == 2


def test_vqa_closed_and_open(client, files):
    r = client.post("/v1/vqa", files={"image": ("x", files["png"])},
                    data={"question": "Is there a pleural effusion?", "choices": "yes,no"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] in ("yes", "no") and sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    r = client.post("/v1/vqa", files={"image": ("x", files["png"])}, data={"question": "Which side?"})
    assert r.status_code == 200 and r.json()["probabilities"] is None


def test_health_model_page_and_openapi(client, files):
    assert client.get("/healthz").json()["status"] == "ok"
    m = client.get("/v1/model").json()
    assert m["image_size"] == 32 and m["vocab"]["codebook"] == 32 and m["batching"]["max_batch_size"] == 16
    assert m["checkpoint"]["uri"].endswith("bundle") and m["code_version"]
    page = client.get("/")
    assert page.status_code == 200 and "/v1/report" in page.text and "X-API-Key" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/report", "/v1/synthesize", "/v1/vqa", "/healthz", "/v1/model"} <= set(paths)


def _truncated_png(png: bytes) -> bytes:
    return png[: len(png) // 2]


@pytest.mark.parametrize("case,status,message", [
    ("text/plain", 415, "send the image as multipart/form-data"),
    ("no image field", 422, "no file in the field 'image'"),
    ("empty", 400, "empty file"),
    ("garbage", 415, "not a PNG, JPEG or DICOM image"),
    ("truncated png", 400, "unreadable image file"),
    ("ct", 400, "non-X-ray modality"),
    ("knee", 400, "non-chest body part"),
    ("nopix", 400, "no pixel data"),
    ("too big", 413, "larger than 0.5 MB"),
    ("bad field", 422, "unknown field beams"),
    ("bad type", 422, "max_new_tokens must be an integer"),
    ("untrained section", 422, "trained to write the findings section, never the impression section"),
])
def test_bad_uploads_get_a_4xx_that_says_what_was_wrong(client, files, case, status, message):
    png = files["png"]
    upload = {"text/plain": None, "no image field": None, "empty": b"", "garbage": b"hello, not an image",
              "truncated png": _truncated_png(png), "ct": files["ct"], "knee": files["knee"], "nopix": files["nopix"],
              "too big": b"\x89PNG\r\n\x1a\n" + bytes(600_000), "bad field": png, "bad type": png,
              "untrained section": png}[case]
    data = {"bad field": {"beams": "2"}, "bad type": {"max_new_tokens": "lots"},
            "untrained section": {"section": "impression"}}.get(case, {})
    if case == "text/plain":
        r = client.post("/v1/report", content=b"hello", headers={"Content-Type": "text/plain"})
    elif case == "no image field":
        r = client.post("/v1/report", data={"section": "findings"}, files={"other": ("x", png)})
    else:
        r = client.post("/v1/report", files={"image": ("Doe^Jane.png", upload)}, data=data)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "doe" not in r.text.lower()
    # The next good request is answered.
    assert client.post("/v1/report", files={"image": ("x", png)}, data={"max_new_tokens": "4"}).status_code == 200


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 422, "must be an object"),
    (json.dumps({"text": ""}).encode(), 422, "text is empty"),
    (json.dumps({"text": "x" * 5000}).encode(), 422, "the limit is 4000"),
    (json.dumps({"text": "ok", "guidance": 3}).encode(), 422, "unknown field guidance"),
    (json.dumps({"text": "ok", "seed": "abc"}).encode(), 422, "seed must be an integer"),
    (json.dumps({"text": 5}).encode(), 422, "text must be a string"),
])
def test_bad_synthesize_bodies(client, body, status, message):
    r = client.post("/v1/synthesize", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_bad_questions_and_wrong_routes(client, files):
    png = files["png"]
    for data, message in [({"question": " "}, "question is empty"), ({"question": "q" * 600}, "the limit is 500"),
                          ({}, "question is missing"), ({"question": "Effusion?", "choices": "yes"}, "two or more")]:
        r = client.post("/v1/vqa", files={"image": ("x", png)}, data=data)
        assert r.status_code == 422 and message in r.json()["error"], r.text
    r = client.post("/v1/synthesize", data={"text": "x"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert client.get("/v1/report").status_code == 405 and "error" in client.get("/v1/report").json()
    assert client.get("/v2/nothing").status_code == 404


def test_an_upload_declared_too_large_is_refused_before_it_is_read(client):
    r = client.post("/v1/report", content=b"x" * 10, headers={"Content-Type": "image/png", "Content-Length": "99999999"})
    assert r.status_code == 413


def test_the_api_key_guards_the_api_but_not_the_page(files, monkeypatch):
    c = _client(files["bundle"], ["serve.api_key=s3cret"])
    assert c.get("/v1/model").status_code == 401
    assert "X-API-Key" in c.get("/v1/model").json()["error"]
    assert c.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/").status_code == 200 and c.get("/healthz").status_code == 200
    monkeypatch.setenv("MAVILT_API_KEY", "from-env")
    assert c.get("/v1/model", headers={"X-API-Key": "from-env"}).status_code == 200


def test_no_checkpoint_is_a_503_that_says_how_to_set_one(tmp_path):
    from fastapi.testclient import TestClient

    from mavilt.serving.api import build_api
    from mavilt.serving.ingress import LocalBackend

    c = TestClient(build_api(LocalBackend(load_config("tiny").serve, str(tmp_path / "nothing"), device="cpu")))
    r = c.get("/v1/model")
    assert r.status_code == 503 and "not a model bundle" in r.json()["error"]
    assert c.get("/healthz").status_code == 503


def test_a_request_over_the_time_limit_gets_a_504(files):
    c = _client(files["bundle"], ["serve.request_timeout_s=0.01"])
    r = c.post("/v1/report", files={"image": ("x", files["png"])}, data={"max_new_tokens": "64", "num_beams": "4"})
    assert r.status_code == 504 and "serve.request_timeout_s" in r.json()["error"]
    assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("preset", ["tiny", "base", "paper"])
def test_each_deployment_takes_its_own_resources_and_batches_are_never_capped(preset):
    from mavilt.serving.deploy import deployment_options

    sv = load_config(preset).serve
    opts = {name: deployment_options(name, sv) for name in ("ingress", "tokenizer", "llm", "decoder")}
    for name, o in opts.items():
        d = getattr(sv, name)
        assert o["ray_actor_options"] == {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
        assert o["max_ongoing_requests"] >= sv.max_batch_size  # Serve's default of 5 would cap each batch at 5
        # The ingress's queue is never the first to overflow (its 503 would come from Serve's proxy, in plain text).
        assert o["max_queued_requests"] >= (sv.max_queued_requests if name != "ingress" else 1024)
    if preset == "tiny":
        assert [opts[n]["ray_actor_options"]["num_cpus"] for n in ("ingress", "tokenizer", "decoder", "llm")] == \
            [0.1, 0.2, 0.2, 0.5]
        scaling = opts["llm"]["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2)
        assert "autoscaling_config" not in opts["tokenizer"] and opts["tokenizer"]["num_replicas"] == 1
    else:
        assert opts["llm"]["ray_actor_options"]["num_gpus"] >= 0.8


def test_the_serve_config_file_is_valid_and_names_an_application_that_builds():
    """What `serve run` / `serve deploy` check first: Ray's own schema (it refuses a relative working_dir), an
    import path that resolves to the application, and no checkpoint set (so the default order applies)."""
    from pathlib import Path

    import yaml
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "serve.app:app" and app.route_prefix == "/"
    assert raw["http_options"]["host"] == "127.0.0.1"  # loopback unless the operator means otherwise
    ingress = next(d for d in app.deployments if d.name == "Ingress")
    assert ingress.user_config == {"checkpoint": None}
    built = import_attr(app.import_path)
    assert type(built).__name__ == "Application"


def test_the_checkpoint_is_user_config_then_the_environment_then_the_demo_run(files, tmp_path, monkeypatch):
    from mavilt.errors import InputError
    from mavilt.serving import models
    from mavilt.serving.models import CHECKPOINT_ENV, resolve_checkpoint

    bundle = str(files["bundle"])
    other = str(build_tiny_bundle(tmp_path / "other", seed=1))
    env = {CHECKPOINT_ENV: other}
    assert resolve_checkpoint(bundle, env).source == "user_config.checkpoint"
    assert resolve_checkpoint(bundle, env).uri.endswith("bundle")
    from_env = resolve_checkpoint(None, env)
    assert from_env.source == CHECKPOINT_ENV and from_env.uri.endswith("other")
    assert from_env.content_hash != resolve_checkpoint(bundle, env).content_hash and from_env.image_size == 32
    # A stage-2 sweep's best.json names its bundle; a tokenizer sweep's names a VQ-GAN checkpoint, not a bundle.
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "best.json").write_text(json.dumps({"job": "sweep_reg", "checkpoint": bundle}))
    assert resolve_checkpoint(str(tmp_path / "stage2" / "best.json"), {}).uri.endswith("bundle")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "best.json").write_text(json.dumps({"job": "sweep_tokenizer", "checkpoint": str(tmp_path)}))
    with pytest.raises(InputError, match="not a model bundle"):
        resolve_checkpoint(str(tmp_path / "tok" / "best.json"), {})
    with pytest.raises(InputError, match="no such file"):
        resolve_checkpoint(str(tmp_path / "nowhere" / "best.json"), {})
    # Nothing set and no demo run: say every way to set one.
    monkeypatch.setattr(models, "DEMO_BUNDLE", ("runs", "no-such-run", "stage2", "bundle"))
    with pytest.raises(InputError, match=f"user_config.checkpoint.*{CHECKPOINT_ENV}.*make demo"):
        resolve_checkpoint(None, {})
