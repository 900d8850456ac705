"""Loading one part of a bundle (what a server's deployment holds) and exporting a bundle self-contained, on
tiny real bundles (random weights, no Ray)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from bundle_factory import build_tiny_bundle

from mavilt.bundle import IMAGE_DECODER, IMAGE_ENCODER, LANGUAGE_MODEL, LOADABLE, MANIFEST, export_bundle, load_bundle
from mavilt.errors import BundleError


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _images(n: int = 2) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    return [g.random((32, 32), dtype=np.float32) for _ in range(n)]


def test_each_part_loads_alone_and_gives_what_the_whole_bundle_gives(bundle_dir):
    whole = load_bundle(bundle_dir, device="cpu")
    codes = whole.encode_images(_images())

    enc = load_bundle(bundle_dir, device="cpu", parts=[IMAGE_ENCODER])
    assert enc.llm is None and enc.tokenizer is None and enc.vqgan.decoder is None and enc.encoder is None
    assert torch.equal(enc.encode_images(_images()), codes)
    with pytest.raises(BundleError, match="without its image_decoder"):
        enc.decode_codes(codes)
    with pytest.raises(BundleError, match="without its llm"):
        enc.report_from_codes(codes)

    llm = load_bundle(bundle_dir, device="cpu", parts=[LANGUAGE_MODEL])
    assert llm.vqgan is None and llm.llm is not None
    assert llm.report_from_codes(codes, max_new_tokens=6) == whole.report_from_codes(codes, max_new_tokens=6)
    with pytest.raises(BundleError, match="without its image_encoder"):
        llm.encode_images(_images())

    dec = load_bundle(bundle_dir, device="cpu", parts=[IMAGE_DECODER])
    assert dec.vqgan.encoder is None and dec.llm is None
    assert torch.equal(dec.decode_codes(codes), whole.decode_codes(codes))
    assert dec.decode_codes(codes).shape == (2, 1, 32, 32)
    # A part holds less than the whole.
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(enc.vqgan) < n(whole.vqgan) and n(dec.vqgan) < n(whole.vqgan)


def test_contrastive_reports_from_a_bundle_are_the_same_alone_and_in_a_batch(bundle_dir):
    """generate.image_contrast: the contrast codes are the same for every row, so a served report does not
    depend on the requests it was batched with."""
    b = load_bundle(bundle_dir, device="cpu", parts=[LANGUAGE_MODEL])
    codes = load_bundle(bundle_dir, device="cpu", parts=[IMAGE_ENCODER]).encode_images(_images(3))
    both = b.report_from_codes(codes, max_new_tokens=8, image_contrast=1.5, num_beams=1)
    assert len(both) == 3 and all(isinstance(r, str) for r in both)
    assert b.report_from_codes(codes[2:], max_new_tokens=8, image_contrast=1.5, num_beams=1) == both[2:]
    assert both != b.report_from_codes(codes, max_new_tokens=8, image_contrast=0.0, num_beams=1)  # it is applied
    # Beam search asked for by a call (the CLI's --beams, a served request) decodes without the contrast.
    assert b.report_from_codes(codes, max_new_tokens=8, image_contrast=1.5, num_beams=2) == \
        b.report_from_codes(codes, max_new_tokens=8, image_contrast=0.0, num_beams=2)


def test_an_evaluation_sends_its_decoding_settings_to_actors_that_load_the_bundle_from_its_path(bundle_dir, tmp_path,
                                                                                               monkeypatch):
    """Ray Data actors load the bundle from its path (with the decoding it was saved with): the evaluation's
    settings must travel with the batches."""
    import json

    from mavilt.eval import evaluate
    from mavilt.eval.predict import BundlePredictor, _columns
    from mavilt.storage import Location

    b = load_bundle(bundle_dir, device="cpu")
    cfg = b.config.with_overrides(["generate.image_contrast=1.5", "generate.num_beams=1", "generate.max_new_tokens=8"])
    sent = {}
    monkeypatch.setattr(evaluate, "predict", lambda task, inputs, **kw: sent.update(kw["overrides"]) or [])
    evaluate.Evaluation(b, Location.of(bundle_dir), Location.of(tmp_path), tmp_path, cfg, "test", None)._predict(
        "report", [])
    assert (sent["image_contrast"], sent["max_new_tokens"]) == (1.5, 8)
    codes = b.encode_images(_images(2))
    actor = BundlePredictor(bundle_path=str(bundle_dir), device="cpu")
    out = [json.loads(o) for o in actor(_columns("report", [{"codes": c} for c in codes.numpy()], sent))["output"]]
    assert out == b.report_from_codes(codes, max_new_tokens=8, image_contrast=1.5, num_beams=1)


def test_unknown_parts_are_refused_by_name(bundle_dir):
    with pytest.raises(BundleError, match="unknown bundle parts \\['vqgan'\\]: choose among"):
        load_bundle(bundle_dir, device="cpu", parts=["vqgan"])
    with pytest.raises(BundleError, match="unknown bundle parts"):
        load_bundle(bundle_dir, device="cpu", parts=[])
    assert set(LOADABLE) >= {IMAGE_ENCODER, LANGUAGE_MODEL, IMAGE_DECODER}


def test_a_lora_bundle_exported_needs_nothing_outside_itself(tmp_path):
    src = build_tiny_bundle(tmp_path / "lora" / "bundle", lora=True, seed=3)
    manifest = json.loads((src / MANIFEST).read_text())
    assert manifest["paths"]["adapter"] and not manifest["paths"]["llm"]
    base = json.loads((src / "theta0" / "theta0.json").read_text())["base"]
    assert base.endswith("bundle.parts/base")  # the bundle points outside itself
    original = load_bundle(src, device="cpu")
    codes = original.encode_images(_images())
    want = original.report_from_codes(codes, max_new_tokens=8)
    probs = original.vqa_from_codes(codes, ["Is there a pleural effusion?"] * 2, [["yes", "no"]] * 2)

    out = export_bundle(src, tmp_path / "exported")
    # Moved elsewhere, with the base LM and the source bundle gone, it loads and answers the same.
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.move(out.path, moved)
    shutil.rmtree(tmp_path / "lora")
    exported = json.loads((moved / MANIFEST).read_text())
    assert exported["paths"]["llm"] == "llm" and exported["paths"]["adapter"] is None and exported["paths"]["theta0"] is None
    assert exported["vocab"] == manifest["vocab"] and exported["content_hash"] != manifest["content_hash"]
    b = load_bundle(moved, device="cpu")
    assert b.report_from_codes(codes, max_new_tokens=8) == want
    got = b.vqa_from_codes(codes, ["Is there a pleural effusion?"] * 2, [["yes", "no"]] * 2)
    for g, w in zip(got, probs):
        assert g["answer"] == w["answer"]
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


def test_the_cli_exports_and_refuses_the_bundle_itself(bundle_dir, tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "mavilt", "export", str(bundle_dir), str(tmp_path / "copy")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("copy") and (tmp_path / "copy" / MANIFEST).is_file()
    assert torch.equal(load_bundle(tmp_path / "copy", device="cpu", parts=[IMAGE_ENCODER]).encode_images(_images()),
                       load_bundle(bundle_dir, device="cpu", parts=[IMAGE_ENCODER]).encode_images(_images()))
    res = subprocess.run([sys.executable, "-m", "mavilt", "export", str(bundle_dir), str(bundle_dir)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "is the bundle itself" in res.stderr


def test_evaluation_refuses_to_score_one_section_against_another(bundle_dir, tmp_path):
    from mavilt.errors import ConfigError
    from mavilt.eval.evaluate import run_evaluate

    # The bundle writes findings: scoring them against reference impressions would measure nothing.
    with pytest.raises(ConfigError, match=r"eval.report_section=impression, but the bundle at .* was trained to "
                                          r"write the findings section .* eval.report_section=findings"):
        run_evaluate(bundle_dir, tmp_path / "data", tmp_path / "out", ["eval.report_section=impression"])
    with pytest.raises(ConfigError, match="stage2.report_section=impression cannot be changed at evaluation"):
        run_evaluate(bundle_dir, tmp_path / "data", tmp_path / "out",
                     ["stage2.report_section=impression", "eval.report_section=impression"])
    assert not (tmp_path / "out").exists()  # refused before anything was written
