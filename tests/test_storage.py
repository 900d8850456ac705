"""Storage on local disk and on a real S3 API (moto's server on loopback): naming, reading and writing,
publishing by a marker written last with writers killed half-way, and local copies made once. No Ray."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mavilt.errors import InputError, StorageError
from mavilt.storage import Location, is_published, is_remote, local_dir, publish_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Location:
    """An empty folder on local disk or in a fresh S3 bucket."""
    if request.param == "local":
        return Location.of(tmp_path / "place")
    return Location.of(request.getfixturevalue("s3") + "/place")


# ---- naming ---------------------------------------------------------------------------------------------


def test_a_place_is_a_local_path_or_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = Location.of("runs/demo")
    assert rel.is_local and rel.uri == str(tmp_path / "runs" / "demo") and os.fspath(rel) == rel.uri
    assert Location.of(f"file://{tmp_path}/a/../b") == Location.of(tmp_path / "b")
    s3 = Location.of("s3://bucket//runs/demo/")
    assert (s3.scheme, s3.path, s3.uri) == ("s3", "bucket/runs/demo", "s3://bucket/runs/demo")
    assert str(s3 / "stage1" / "result.json") == "s3://bucket/runs/demo/stage1/result.json"
    assert (s3.name, str(s3.parent)) == ("demo", "s3://bucket/runs")
    assert pickle.loads(pickle.dumps(s3)) == s3 and Location.of(s3) is s3
    assert is_remote("s3://b/x") and is_remote(s3) and not is_remote("file:///x") and not is_remote(rel)
    with pytest.raises(StorageError, match="object store; it must be copied locally"):
        os.fspath(s3)


@pytest.mark.parametrize("bad, message", [
    ("http://host/x", "unknown storage scheme 'http://'"),
    ("hdfs://namenode/x", "use a local path, file://, s3:// or gs://"),
    ("s3://", "names no bucket"),
    ("", "an empty path"),
])
def test_bad_places_fail_with_one_message(bad, message):
    with pytest.raises(InputError, match=message):
        Location.of(bad)


def test_a_missing_bucket_is_named_with_the_fix(s3_server):
    with pytest.raises(StorageError, match=r"cannot create s3://no-such-bucket-x1/runs.*bucket must exist"):
        Location.of("s3://no-such-bucket-x1/runs").mkdir()
    with pytest.raises(StorageError, match="cannot write s3://no-such-bucket-x1/a.json"):
        Location.of("s3://no-such-bucket-x1/a.json").write_text("{}")


# ---- files and folders ----------------------------------------------------------------------------------


def test_files_are_written_read_listed_and_removed(place):
    assert not place.exists()
    (place / "a.json").write_json({"x": 1})
    (place / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (place / ".hidden.parquet").write_bytes(b"")
    (place / "c.parquet").write_bytes(b"pq")
    assert place.is_dir() and (place / "a.json").is_file() and not (place / "a.json").is_dir()
    assert json.loads((place / "a.json").read_text()) == {"x": 1}
    assert [x.name for x in place.iterdir()] == [".hidden.parquet", "a.json", "c.parquet", "sub"]
    assert [x.name for x in place.files(".parquet")] == ["c.parquet"]  # hidden ones are never read as data
    assert [(rel, size) for rel, size, _ in place.walk()] == [(".hidden.parquet", 0), ("a.json", 13), ("c.parquet", 2),
                                                              ("sub/b.bin", 2)]
    log = place / "history.jsonl"
    log.append_text('{"step": 1}\n')
    log.append_text('{"step": 2}\n')
    assert log.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    (place / "a.json").write_text("replaced")
    assert (place / "a.json").read_text() == "replaced"
    with pytest.raises(FileNotFoundError):
        (place / "nothing.txt").read_bytes()
    (place / "sub").remove()
    assert not (place / "sub" / "b.bin").exists()
    place.remove()
    assert not place.exists() and place.iterdir() == []
    place.remove()  # removing what is not there is nothing


def test_upload_then_download_round_trips_a_tree(place, tmp_path):
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "deep" / "er" / "leaf.bin").write_bytes(os.urandom(1000))
    (src / "skipped.pt").write_bytes(b"optimizer state")
    place.upload(src, skip={"skipped.pt"})
    back = place.download(tmp_path / "back")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == ["deep/er/leaf.bin", "top.txt"]
    assert (back / "deep" / "er" / "leaf.bin").read_bytes() == (src / "deep" / "er" / "leaf.bin").read_bytes()
    only = place.download(tmp_path / "only", include=["top.txt"])
    assert [p.name for p in only.iterdir()] == ["top.txt"]


# ---- publishing, with writers killed half-way -----------------------------------------------------------


def _folder(root: Path, n: int, tag: str) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"part-{i:03d}.bin").write_text(f"{tag} {i}\n")
    (root / "manifest.json").write_text(json.dumps({"tag": tag, "files": n}))
    return root


# The child publishes slowly (every file copy sleeps), so it can be killed between its first and last file.
SLOW_WRITER = textwrap.dedent("""
    import shutil, sys, time
    import pyarrow.fs as pafs
    from mavilt.storage import publish_dir
    slow = lambda f: (lambda *a, **k: (time.sleep(0.05), f(*a, **k))[1])
    shutil.copy2 = slow(shutil.copy2)
    pafs.copy_files = slow(pafs.copy_files)
    print("started", flush=True)
    publish_dir(sys.argv[1], sys.argv[2], "manifest.json")
""")


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_publication_killed_half_way_is_never_read_and_is_replaced(place, tmp_path):
    old = _folder(tmp_path / "old", 3, "old")
    publish_dir(old, place, "manifest.json")
    assert is_published(place, "manifest.json")

    new = _folder(tmp_path / "new", 40, "new")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(new), place.uri], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    _kill_when(proc, lambda: len([f for f in place.walk() if f[0].startswith("part-")]) >= 5
               and not (place / "part-000.bin").read_text().startswith("old"))
    # Killed half-way: some new files are there, the marker is not, so no reader takes it for a finished folder.
    assert 5 <= len(place.walk()) < 40 and not is_published(place, "manifest.json")

    newer = _folder(tmp_path / "newer", 4, "newer")
    publish_dir(newer, place, "manifest.json")
    assert is_published(place, "manifest.json")
    assert [rel for rel, _, _ in place.walk()] == ["manifest.json"] + [f"part-{i:03d}.bin" for i in range(4)]
    assert json.loads((place / "manifest.json").read_text())["tag"] == "newer"


def test_a_bundle_without_its_manifest_is_refused(place, tmp_path):
    from mavilt.bundle import load_bundle
    from mavilt.errors import BundleError

    (place / "llm" / "config.json").write_text("{}")
    with pytest.raises(BundleError, match=r"is not a model bundle \(no mavilt.json\)"):
        load_bundle(place.uri)


def test_a_prepare_killed_half_way_leaves_no_dataset_and_the_next_run_replaces_it(s3, tiny_cfg):
    from mavilt.data.prepare import prepare_dataset
    from mavilt.data.shards import check_dataset, read_rows
    from mavilt.errors import DatasetError

    data = Location.of(s3 + "/data")
    cfg = tiny_cfg.with_overrides(["data.image_size=32", "data.rows_per_file=4"])
    writer = textwrap.dedent(f"""
        from mavilt.config import load_config
        from mavilt.data.prepare import prepare_dataset
        prepare_dataset("synthetic", "{data.uri}", load_config("tiny", ["data.image_size=32", "data.rows_per_file=4"]),
                        num_samples=400, use_ray=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    _kill_when(proc, lambda: len((data / "train").files(".parquet")) >= 3)
    with pytest.raises(DatasetError, match="has no manifest.json"):
        check_dataset(data)

    manifest = prepare_dataset("synthetic", data, cfg, num_samples=24, use_ray=False)
    check_dataset(data)
    rows = sum(len(read_rows(data, split, columns=["image_id"])) for split in ("train", "validate", "test"))
    assert rows == manifest["total_images"] == 24  # the killed run's parts are gone: nothing is counted twice


# ---- local copies ---------------------------------------------------------------------------------------


def test_a_folder_on_a_store_is_copied_once_and_again_only_when_it_changes(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("MAVILT_CACHE", str(tmp_path / "cache"))
    remote = Location.of(s3 + "/model")
    publish_dir(_folder(tmp_path / "m1", 3, "v1"), remote, "manifest.json")
    copies = []
    download = Location.download
    monkeypatch.setattr(Location, "download", lambda self, *a, **k: copies.append(self.uri) or download(self, *a, **k))

    first = local_dir(remote)
    assert (first / "part-002.bin").read_text() == "v1 2\n" and first.is_relative_to(tmp_path / "cache" / "remote")
    assert local_dir(remote) == first and len(copies) == 1  # the second load copies nothing
    by_manifest = local_dir(remote, key_file="manifest.json")
    assert local_dir(remote, key_file="manifest.json") == by_manifest and len(copies) == 2
    only = local_dir(remote, include=["manifest.json"])
    assert [p.name for p in only.iterdir() if not p.name.startswith(".")] == ["manifest.json"]

    publish_dir(_folder(tmp_path / "m2", 3, "v2"), remote, "manifest.json")
    changed = local_dir(remote, key_file="manifest.json")
    assert changed != by_manifest and (changed / "part-000.bin").read_text() == "v2 0\n"
    local = tmp_path / "m2"
    assert local_dir(local) == local  # a local folder is used where it is


def test_results_land_where_the_output_says(place):
    from mavilt.runs import StepOutput, finish, read_result

    result = finish("vqgan", place, place / "checkpoint_000001", {"val_loss": 0.5, "nan": float("nan")}, "abc")
    out = StepOutput(place)
    assert read_result(place) == result["line"] and result["output"] == place.uri
    assert result["checkpoint"] == f"{place.uri}/checkpoint_000001"
    assert json.loads(out.metrics.read_text()) == {"val_loss": 0.5, "nan": None}


def test_a_result_line_keeps_the_headline_under_2_kb_and_metrics_json_everything(tmp_path):
    from mavilt.runs import RESULT_LINE_BYTES, finish, read_metrics, read_result

    per_observation = {f"val_auroc/{i:02d}-observation-with-a-long-name": 0.123456789 for i in range(60)}
    metrics = {"val_loss": 0.5, "step": 900, "counts": {"train": 3, "test": 1}, "tables": {"rows": list(range(500))},
               **per_observation}
    result = finish("encoder", tmp_path, tmp_path / "checkpoint_1", metrics, "abc", picked={"headline": 1.0})
    line = read_result(tmp_path)
    assert line == result["line"] and len(json.dumps(line)) <= RESULT_LINE_BYTES
    kept = line["metrics"]
    assert kept["headline"] == 1.0 and kept["val_loss"] == 0.5 and kept["counts"] == {"train": 3, "test": 1}
    assert "tables" not in kept and 0 < sum(k.startswith("val_auroc/") for k in kept) < 60
    assert read_metrics(tmp_path) == metrics == result["metrics"]  # everything, in metrics.json


def test_a_resumed_attempt_marks_the_lost_steps_and_logs_what_it_resumed(place, capfd):
    from mavilt.train.faults import DRILL_MARKER, begin_attempt

    log = place / "history.jsonl"
    first = begin_attempt(place.uri, log, 0, ["node-a", "node-a"])
    assert first.pop("time") > 0
    assert first == {"event": "attempt", "attempt": 1, "resumed_from_step": 0, "lost_steps": [], "nodes": ["node-a"] * 2}
    log.append_text("".join(json.dumps({"step": s, "train_loss": 1 / s, "attempt": 1}) + "\n" for s in range(1, 8))
                    + '{"step": 8, "tr')  # the attempt died mid-line
    (place / DRILL_MARKER).write_text(json.dumps({"step": 8, "rank": 1}))  # the drilled rank got to step 8
    second = begin_attempt(place.uri, log, 4, ["node-b", "node-c"])
    assert second["attempt"] == 2 and second["resumed_from_step"] == 4 and second["lost_steps"] == [5, 8]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))  # the half-written line is gone
    assert [r["step"] for r in steps if r.get("lost")] == [5, 6, 7]
    assert [r["attempt"] for r in records if r.get("event")] == [1, 2]
    assert "attempt 2 on node(s) node-b, node-c: starts at step 5 from the checkpoint of step 4; steps 5..8 of " \
           "attempt 1 were lost" in capfd.readouterr().err
    # A third attempt from the same checkpoint does not count the already-lost records again.
    assert begin_attempt(place.uri, log, 7, ["node-b"])["lost_steps"] == []


