"""The inference CLI end to end on a tiny real bundle (random weights, no Ray): report (PNG and DICOM, no PHI in
any output), synthesize (PNG files of the bundle's size), vqa (answer in the choices, probabilities summing to 1),
and user errors (one line on stderr, exit status 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import build_tiny_bundle
from fixtures_sources import PHI_NEEDLES, quadrants, write_dicom
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SIZE = 32  # the tiny bundle's image size


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    bundle = build_tiny_bundle(root / "bundle")
    png = root / "chest.png"
    Image.fromarray(quadrants(48, 40, 10, 250, 130, dtype=np.uint8)).save(png)
    dcm = write_dicom(root / "study.dcm", quadrants(64, 64, bg=1000, hi=60000, mid=30000))
    assert b"Doe^Jane" in dcm.read_bytes()  # the PHI really is in the file
    return {"root": root, "bundle": bundle, "png": png, "dcm": dcm}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mavilt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_user_error(res: subprocess.CompletedProcess, *parts: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for p in parts:
        assert p in lines[0], lines[0]


def test_report_png_and_dicom_without_phi(world):
    res = cli("report", world["png"], world["dcm"], "--bundle", world["bundle"], "--device", "cpu", "--json",
              "--max-new-tokens", "6", "--beams", "1")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [r["path"] for r in rows] == [str(world["png"]), str(world["dcm"])]
    assert all(isinstance(r["report"], str) for r in rows)
    text = (res.stdout + res.stderr).lower()
    for needle in PHI_NEEDLES:
        assert needle.lower() not in text, needle


def test_synthesize_writes_pngs_of_the_bundle_size(world):
    out = world["root"] / "gen" / "cxr.png"
    res = cli("synthesize", "Moderate cardiomegaly. Small left pleural effusion.", "-o", out, "--bundle",
              world["bundle"], "--num", "2", "--seed", "3", "--cfg-scale", "2")
    assert res.returncode == 0, res.stderr
    written = [out.with_name("cxr_0.png"), out.with_name("cxr_1.png")]
    assert res.stdout.split() == [str(p) for p in written]
    for p in written:
        with Image.open(p) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "L"


def test_vqa_closed_question(world):
    res = cli("vqa", world["dcm"], "Is there a pleural effusion?", "--choices", "yes,no", "--bundle", world["bundle"],
              "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["answer"] in ("yes", "no")
    assert set(out["probabilities"]) == {"yes", "no"}
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert out["answer"] == max(out["probabilities"], key=out["probabilities"].get)
    for needle in PHI_NEEDLES:
        assert needle.lower() not in (res.stdout + res.stderr).lower()


def test_user_errors_are_one_line_and_exit_2(world, tmp_path):
    assert_user_error(cli("report", tmp_path / "missing.png", "--bundle", world["bundle"]),
                      "image file not found", "missing.png")
    assert_user_error(cli("report", world["png"], "--bundle", tmp_path), "is not a model bundle", "mavilt.json")


# ---- the same entry point in-process (faster) for the remaining cases --------------------------------------


@pytest.fixture(autouse=True)
def _scoped_env(monkeypatch):
    # main() sets these with setdefault; set them here so they are undone after each in-process test.
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        monkeypatch.setenv(k, v)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from mavilt.__main__ import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_plain_outputs(world, capsys):
    rc, out, _ = run_main(capsys, "report", world["png"], world["png"], "--bundle", world["bundle"], "--device", "cpu",
                          "--max-new-tokens", "4", "--section", "findings", "--batch-size", "1")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all(ln.split("\t")[0] == str(world["png"]) and ln.count("\t") == 1 for ln in lines)
    assert lines[0] == lines[1]  # deterministic decoding, batch of one each
    rc, out, _ = run_main(capsys, "vqa", world["png"], "Is the heart enlarged?", "--choices", "yes, no, maybe",
                          "--bundle", world["bundle"])
    assert rc == 0
    first, *probs = out.splitlines()
    table = dict(ln.split("\t") for ln in probs)
    assert first in ("yes", "no", "maybe") and set(table) == {"yes", "no", "maybe"}
    assert sum(map(float, table.values())) == pytest.approx(1.0, abs=1e-3)
    rc, out, _ = run_main(capsys, "vqa", world["png"], "Which side?", "--bundle", world["bundle"], "--json")
    assert rc == 0 and json.loads(out)["probabilities"] is None  # open question: decoded text
    out_png = world["root"] / "one.png"
    rc, out, _ = run_main(capsys, "synthesize", "No acute findings.", "-o", out_png, "--bundle", world["bundle"],
                          "--temperature", "0")
    assert rc == 0 and out.strip() == str(out_png) and out_png.exists()


def test_more_user_errors(world, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cases = [
        (("report", bad, "--bundle", world["bundle"]), "bad.png is not a PNG, JPEG or DICOM image (it starts with text)"),
        # inputs and outputs are checked before the bundle: the missing bundle is not what is reported
        (("report", bad, "--bundle", tmp_path / "nowhere"), "bad.png is not a PNG, JPEG or DICOM image"),
        (("synthesize", "x", "-o", bad / "out.png", "--bundle", tmp_path / "nowhere"), "is a file, not a folder"),
        (("report", tmp_path, "--bundle", world["bundle"]), "not a file"),
        (("report", world["png"], "--bundle", tmp_path / "nowhere"), "bundle folder not found"),
        (("report", world["png"], "--bundle", world["bundle"], "--beams", "0"), "--beams: num_beams must be in [1, 8], got 0"),
        (("report", world["png"], "--bundle", world["bundle"], "--device", "tpu"), "--device tpu"),
        (("synthesize", "x", "-o", tmp_path / "a.jpg", "--bundle", world["bundle"]), "must be a .png file"),
        (("synthesize", "  ", "-o", tmp_path / "a.png", "--bundle", world["bundle"]), "the report text: text is empty"),
        (("vqa", world["png"], "Is it?", "--choices", "yes", "--bundle", world["bundle"]), "two or more distinct"),
    ]
    for args, part in cases:
        rc, out, err = run_main(capsys, *args)
        assert rc == 2 and out == "", args
        assert len(err.strip().splitlines()) == 1 and part in err, (args, err)
    # a folder with a manifest but broken contents: one line too
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mavilt.json").write_text("{}")
    rc, _, err = run_main(capsys, "report", world["png"], "--bundle", broken)
    assert rc == 2 and "cannot load the model bundle" in err and len(err.strip().splitlines()) == 1


def test_report_skips_a_bad_file_answers_the_others_and_says_so_in_its_status(world, tmp_path, capsys):
    from mavilt.__main__ import EXIT_SOME_SKIPPED

    empty, text = tmp_path / "empty.dcm", tmp_path / "notes.png"
    empty.write_bytes(b"")
    text.write_text("patient notes, not an image")
    rc, out, err = run_main(capsys, "report", world["png"], text, world["dcm"], empty, tmp_path / "gone.png",
                            "--bundle", world["bundle"], "--json", "--max-new-tokens", "4", "--beams", "1")
    assert rc == EXIT_SOME_SKIPPED == 3
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["path"] for r in rows if "report" in r] == [str(world["png"]), str(world["dcm"])]
    skipped = {r["path"]: r["skipped"] for r in rows if "skipped" in r}
    assert skipped == {str(text): f"{text} is not a PNG, JPEG or DICOM image (it starts with text)",
                       str(empty): f"{empty} is not a PNG, JPEG or DICOM image (it is empty)",
                       str(tmp_path / "gone.png"): f"image file not found: {tmp_path / 'gone.png'}"}
    assert len(err.strip().splitlines()) == 3 and all(" skipped: " in ln for ln in err.strip().splitlines())
    # Plain text output: the same, the answered lines only on stdout.
    rc, out, _ = run_main(capsys, "report", world["png"], text, "--bundle", world["bundle"], "--max-new-tokens", "4")
    assert rc == 3 and [ln.split("\t")[0] for ln in out.splitlines()] == [str(world["png"])]


def test_warnings_where_the_model_cannot_do_what_was_asked(world, tmp_path, capsys, caplog):
    long_text = " ".join(["Moderate cardiomegaly with a small left pleural effusion."] * 30)
    rc, _, _ = run_main(capsys, "synthesize", long_text, "-o", tmp_path / "long.png", "--bundle", world["bundle"])
    assert rc == 0 and (tmp_path / "long.png").exists()
    cut = [r.getMessage() for r in caplog.records if "are not used" in r.getMessage()]
    assert len(cut) == 1 and "the model's context (llm.max_length 96, 16 of it image codes)" in cut[0], cut
    caplog.clear()
    # A section the bundle was never trained on is refused, not answered in the trained section's style.
    rc, out, err = run_main(capsys, "report", world["png"], "--bundle", world["bundle"], "--section", "impression",
                            "--max-new-tokens", "4")
    assert rc == 2 and out == "" and "trained to write the findings section, never the impression section" in err
    caplog.clear()
    rc, _, _ = run_main(capsys, "vqa", world["png"], "Is there " + "a large " * 26 + "effusion?", "--choices",
                        "yes,no", "--bundle", world["bundle"])
    assert rc == 0 and any("shorten the question" in r.getMessage() for r in caplog.records)


def test_an_unknown_option_shows_the_subcommands_usage(world, capsys):
    from mavilt.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["report", str(world["png"]), "--bundle", str(world["bundle"]), "--beem", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage: python -m mavilt report" in err and "unrecognized arguments: --beem 3" in err


def test_help_and_manifest_name(capsys):
    from mavilt.__main__ import MANIFEST_NAME, build_parser
    from mavilt.bundle import MANIFEST

    assert MANIFEST_NAME == MANIFEST
    for cmd in ("report", "synthesize", "vqa"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "--bundle" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "python -m mavilt synthesize" in capsys.readouterr().out


def test_bundles_written_before_the_config_change_load_and_newer_formats_are_refused(world, tmp_path):
    """A bundle whose config is version 1 (with the keys that version offered and nothing read) still loads and
    answers; a bundle of a newer format fails with one message naming its version and what to do."""
    import shutil

    from mavilt import load_bundle
    from mavilt.errors import BundleError

    old = tmp_path / "old"
    shutil.copytree(world["bundle"], old)
    manifest = json.loads((old / "mavilt.json").read_text())
    cfg = manifest["config"]
    cfg.pop("config_version")
    cfg["pretrain_text"]["lambda_reg"] = 0.0
    cfg["stage2"]["heldout_fraction"] = 0.05
    cfg["tune"], cfg["serve"] = {"num_samples": 8}, {"max_replicas": 2}
    (old / "mavilt.json").write_text(json.dumps(manifest))
    b = load_bundle(old, device="cpu")
    assert b.config.stage2.report_section == "findings" and len(b.report(np.zeros((1, SIZE, SIZE), np.float32))) == 1

    newer = tmp_path / "newer"
    shutil.copytree(world["bundle"], newer)
    (newer / "mavilt.json").write_text(json.dumps({**manifest, "format_version": 7, "code_version": "abc123"}))
    with pytest.raises(BundleError, match="has format version 7; this code reads version 1: load it with the MAViLT "
                                          "version that wrote it \\(code version abc123\\) or re-run stage 2"):
        load_bundle(newer, device="cpu")
