"""Start-up time (issue 13, part 1): how long a fresh process takes before it answers, against the model's own work.

Each figure comes from fresh interpreters (subprocesses), the median over the repeats:

(a) the CLI's cold start: ``python -m mavilt report IMAGE --bundle BUNDLE`` end to end (run through a small
    probe that times ``load_bundle`` and ``Bundle.report`` from inside; the probe costs a few milliseconds);
(b) the same command under ``python -X importtime`` (the first of the repeats; it adds no measurable time): the
    largest imports, by top-level package;
(c) the model's work: the time inside that process's ``Bundle.report`` call (encode the image, write the report);
(d) a Serve replica's cold start, without Ray Serve: a fresh process builds the LLM deployment's model
    (``mavilt.serving.models.LanguageModel``, what ``serve/app.py``'s ``LLM.__init__`` builds), loads the bundle
    the way the deployment's ``load`` does before it takes traffic, and answers its first report request;
and, for reference, the imports the CLI cannot avoid: ``torch``, transformers' model module for the bundle's
LLM, ``vector_quantize_pytorch`` and ``tokenizers`` in a bare interpreter.

``--before REF`` measures a checkout of REF as well (a temporary ``git worktree``, removed afterwards; its
``mavilt`` is the one imported, via the working directory and ``PYTHONPATH``), interleaved with this tree.

    python benchmarks/startup.py                        # 5 repeats on runs/demo/stage2/bundle (else a tiny one)
    python benchmarks/startup.py --before HEAD          # and the committed code, side by side
    python benchmarks/startup.py --quick                # what benchmarks/run_all.py runs (1 repeat, < 60 s)
    python benchmarks/startup.py --bundle PATH --repeat 3

The children run with one intra-op thread (``OMP_NUM_THREADS=1``; ``--threads 0`` keeps the environment's):
on a shared 2-core machine torch's default threads spin against other processes and make the first forward
pass 2-10x slower from run to run, which would drown what start-up costs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))
from common import Row, fmt, markdown_table, result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "runs" / "demo" / "stage2" / "bundle"
BUNDLE_FACTORY = ROOT / "tests" / "bundle_factory.py"
OUT_ENV = "MAVILT_STARTUP_OUT"
TARGET_VS_FLOOR = 1.5  # the CLI's cold start within 1.5x of the imports it cannot avoid
TARGET_VS_BEFORE = 0.5  # the target: at most half of the start-up before trimming

# Runs the CLI as `python -m mavilt` does, timing the first load_bundle and Bundle.report calls from inside.
# The CLI imports mavilt.bundle lazily, so the two are wrapped when that module is first imported (a finder
# that steps aside after it): the import order and everything imported stay the CLI's own.
CLI_PROBE = r"""
import importlib.abc, importlib.util, json, os, runpy, sys, time
times = {}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        times.setdefault(name + "_at", time.time())
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.setdefault(name, time.perf_counter() - t)
    return wrapper

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "mavilt.bundle":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.load_bundle = timed("load_s", module.load_bundle)
            module.Bundle.report = timed("report_s", module.Bundle.report)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
sys.argv = ["mavilt", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("mavilt", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
times["mavilt"] = sys.modules["mavilt"].__file__
with open(os.environ["MAVILT_STARTUP_OUT"], "w") as f:
    json.dump(times, f)
sys.exit(code)
"""

# The LLM deployment's replica, without Ray: its __init__ (serve/app.py: LLM -> LanguageModel), its load(uri)
# (the ingress warms every part with the checkpoint before it serves it), then one report request on codes.
REPLICA_PROBE = r"""
import json, os, sys, time
T0 = time.perf_counter()
from mavilt.serving.models import LanguageModel, resolve_checkpoint
from mavilt.serving.requests import ReportRequest
ck = resolve_checkpoint(sys.argv[1])
model = LanguageModel()
bundle = model.cache.get(ck.uri)
ready = time.perf_counter()
import numpy as np
v = bundle.vocab
codes = np.random.default_rng(0).integers(0, v.codebook_size, v.tokens_per_image)
t = time.perf_counter()
model.report([(ck.uri, codes, ReportRequest.parse({}))])
answered = time.time()
with open(os.environ["MAVILT_STARTUP_OUT"], "w") as f:
    json.dump({"ready_s": ready - T0, "first_s": time.perf_counter() - t, "answered_at": answered,
               "mavilt": sys.modules["mavilt"].__file__}, f)
"""


@dataclass
class Tree:
    """A checkout whose ``mavilt`` the children import: this one, or a worktree of ``--before``."""

    label: str
    root: Path
    samples: dict[str, list[float]] = field(default_factory=dict)
    imports: list[tuple[str, float, str, str]] = field(default_factory=list)
    import_total_s: float = 0.0

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return statistics.median(self.samples[key])


# ---- the children ----------------------------------------------------------------------------------------


def _env(tree: Path, threads: int, out: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if out is not None:
        env[OUT_ENV] = str(out)
    return env


def _cpu_of_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(cmd: list[str], tree: Path, threads: int, *, timeout: float = 300, capture_stderr: bool = False
         ) -> tuple[float, dict[str, Any], str]:
    """(wall seconds, what the probe wrote, stderr) of one fresh process run from ``tree``; the probe's dict also
    gets ``cpu_s``, the process's CPU seconds (user + system)."""
    with tempfile.TemporaryDirectory(prefix="mavilt-startup-") as tmp:
        out = Path(tmp) / "probe.json"
        cpu0 = _cpu_of_children()
        t = time.perf_counter()
        started = time.time()
        proc = subprocess.run(cmd, cwd=tree, env=_env(tree, threads, out), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
        wall = time.perf_counter() - t
        cpu = _cpu_of_children() - cpu0
        if proc.returncode != 0:
            tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {tail}")
        probe = json.loads(out.read_text()) if out.is_file() else {}
    probe.update(started_at=started, cpu_s=cpu)
    if "mavilt" in probe and not Path(probe["mavilt"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the child imported {probe['mavilt']}, not the mavilt of {tree}")
    return wall, probe, proc.stderr if capture_stderr else ""


def measure_cli(tree: Tree, image: Path, bundle: Path, threads: int, *, importtime: bool = False) -> None:
    """One cold start of the CLI; with ``importtime`` under ``-X importtime`` as well (it costs no measurable
    time: the same CPU seconds with and without), whose output gives the tree's largest imports."""
    flags = ["-X", "importtime"] if importtime else []
    wall, probe, err = _run([sys.executable, *flags, "-c", CLI_PROBE, "report", str(image), "--bundle", str(bundle)],
                            tree.root, threads, capture_stderr=importtime)
    tree.add("cli_s", wall)
    tree.add("cli_cpu_s", probe["cpu_s"])
    tree.add("model_s", probe["report_s"])
    tree.add("load_s", probe["load_s"])
    # From the process's start until load_bundle is called: interpreter, the CLI's imports, input checks.
    before = probe["load_s_at"] - probe["started_at"]
    tree.add("before_load_s", before)
    tree.add("after_s", wall - before - probe["load_s"] - probe["report_s"])  # printing, interpreter exit
    if importtime:
        tree.imports, tree.import_total_s = top_imports(err)


def measure_replica(tree: Tree, bundle: Path, threads: int) -> None:
    _, probe, _ = _run([sys.executable, "-c", REPLICA_PROBE, str(bundle)], tree.root, threads)
    tree.add("replica_s", probe["answered_at"] - probe["started_at"])  # process start -> first answer
    tree.add("replica_cpu_s", probe["cpu_s"])  # the whole process, its exit included
    tree.add("replica_ready_s", probe["ready_s"])
    tree.add("replica_first_s", probe["first_s"])


def measure_floor(tree: Tree, model_module: str, threads: int) -> None:
    code = f"import torch, {model_module}, vector_quantize_pytorch, tokenizers"
    wall, probe, _ = _run([sys.executable, "-c", code], tree.root, threads)
    tree.add("floor_s", wall)
    tree.add("floor_cpu_s", probe["cpu_s"])


# ---- -X importtime ---------------------------------------------------------------------------------------

_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def top_imports(text: str, n: int = 5) -> tuple[list[tuple[str, float, str, str]], float]:
    """From ``-X importtime`` output: the ``n`` top-level packages that cost most, as ``(package, seconds,
    its largest entry, what imported that entry)``, and the total import time (the root entries' sum).

    A package's cost is the cumulative time of each entry of it that something outside it imported, summed:
    what importing it (and what it pulls in) cost, wherever it came from. Packages nest (torch inside
    transformers), so the costs overlap. Python times only ``import`` statements: a module loaded through
    ``importlib.import_module`` (transformers' lazy modules) is not itself listed, only what it imports, so a
    lazily loading package's figure is a lower bound."""
    entries: list[tuple[int, str, float]] = []  # (depth, name, cumulative seconds), children before parents
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            entries.append((len(m.group(3)) // 2, m.group(4), int(m.group(2)) / 1e6))
    parent: dict[int, int | None] = {}
    stack: list[int] = []  # entries whose parent is not known yet
    for i, (depth, _, _) in enumerate(entries):
        while stack and entries[stack[-1]][0] > depth:
            parent[stack.pop()] = i
        stack.append(i)
    for i in stack:
        parent[i] = None
    total = sum(cum for i, (_, _, cum) in enumerate(entries) if parent[i] is None)
    cost: dict[str, float] = {}
    largest: dict[str, tuple[float, str, str]] = {}
    for i, (_, name, cum) in enumerate(entries):
        pkg = name.split(".")[0]
        p = parent[i]
        if p is not None and entries[p][1].split(".")[0] == pkg:
            continue
        cost[pkg] = cost.get(pkg, 0.0) + cum
        if cum > largest.get(pkg, (0.0, "", ""))[0]:
            largest[pkg] = (cum, name, entries[p][1] if p is not None else "")
    top = sorted(cost.items(), key=lambda kv: -kv[1])[:n]
    return [(pkg, s, *largest[pkg][1:]) for pkg, s in top], total


# ---- set-up ----------------------------------------------------------------------------------------------


def _bundle(arg: str | None, tmp: Path) -> tuple[Path, str]:
    """(the bundle, where it came from): --bundle, else the demo run's, else a tiny one built here."""
    if arg:
        p = Path(arg).resolve()
        if not (p / "mavilt.json").is_file():
            raise SystemExit(f"--bundle {arg}: not a model bundle (no mavilt.json)")
        return p, f"`{arg}`"
    if (DEMO_BUNDLE / "mavilt.json").is_file():
        return DEMO_BUNDLE, "`runs/demo/stage2/bundle` (the demo run's)"
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundle_factory", BUNDLE_FACTORY)
    factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory)
    return factory.build_tiny_bundle(tmp / "bundle"), "a tiny bundle with random weights (tests/bundle_factory.py)"


def _image(bundle: Path, tmp: Path) -> Path:
    """A smooth 8-bit grey PNG at the bundle's image size (the CLI reads and resizes it like any other)."""
    import numpy as np
    from PIL import Image

    size = int(json.loads((bundle / "mavilt.json").read_text())["image_size"])
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    px = (255 * (0.5 + 0.4 * np.sin(3 * x) * np.cos(2 * y))).astype(np.uint8)
    path = tmp / "cxr.png"
    Image.fromarray(px).save(path)
    return path


def _model_module(bundle: Path) -> str:
    """transformers' modeling module for the bundle's LLM (what loading it must import)."""
    manifest = json.loads((bundle / "mavilt.json").read_text())
    cfg_path = bundle / str((manifest.get("paths") or {}).get("llm") or "llm") / "config.json"
    kind = "llama"
    if cfg_path.is_file():
        kind = str(json.loads(cfg_path.read_text()).get("model_type") or kind).replace("-", "_")
    return f"transformers.models.{kind}.modeling_{kind}"


def _worktree(ref: str, tmp: Path) -> Path:
    path = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref], check=True)
    return path


def _remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False,
                   capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False, capture_output=True)


# ---- report ----------------------------------------------------------------------------------------------


def _spread(xs: list[float]) -> str:
    return fmt(statistics.median(xs), "s") + (f" ({fmt(min(xs))}-{fmt(max(xs))}, n={len(xs)})" if len(xs) > 1 else "")


def build_rows(ours: Tree, before: Tree | None) -> list[Row]:
    """Wall seconds against the model's work; comparisons between processes in CPU seconds (one thread each),
    which a shared machine's load barely moves while it stretches wall time 2-3x from run to run."""
    cli, model = ours.med("cli_s"), ours.med("model_s")
    replica, first = ours.med("replica_s"), ours.med("replica_first_s")
    cli_cpu, floor_cpu = ours.med("cli_cpu_s"), ours.med("floor_cpu_s")
    rows = [
        Row("start-up", "CLI cold start: `python -m mavilt report` on one image (s)", fmt(cli, "s"),
            f"the model's work in it: {fmt(model, 's')}", cli / model),
        Row("start-up", "Serve LLM replica cold start: process start to its first report (s)", fmt(replica, "s"),
            f"the model's work in it: {fmt(first, 's')}", replica / first),
        Row("start-up", "CLI cold start against the imports it cannot avoid (CPU s)", fmt(cli_cpu, "s"),
            f"torch + transformers' model + VQ + tokenizers: {fmt(floor_cpu, 's')}", cli_cpu / floor_cpu,
            f"<= {TARGET_VS_FLOOR:g}x", cli_cpu / floor_cpu <= TARGET_VS_FLOOR),
    ]
    if before is not None:
        b_cli, b_replica = before.med("cli_cpu_s"), before.med("replica_cpu_s")
        rows += [
            Row("start-up", f"CLI cold start against {before.label} (CPU s)", fmt(cli_cpu, "s"),
                f"{before.label}: {fmt(b_cli, 's')}", cli_cpu / b_cli, f"<= {TARGET_VS_BEFORE:g}x",
                cli_cpu / b_cli <= TARGET_VS_BEFORE),
            Row("start-up", f"Serve LLM replica cold start against {before.label} (CPU s)",
                fmt(ours.med("replica_cpu_s"), "s"), f"{before.label}: {fmt(b_replica, 's')}",
                ours.med("replica_cpu_s") / b_replica),
        ]
    return rows


def details(trees: list[Tree], bundle_desc: str, floor_module: str, threads: int, repeat: int) -> str:
    keys = [("cli_s", "CLI cold start (`report`, one image), wall"),
            ("cli_cpu_s", "  its CPU seconds"),
            ("before_load_s", "  in it: until load_bundle (interpreter start, the CLI's imports, input checks)"),
            ("load_s", "  in it: load_bundle (its lazy torch/transformers/VQ imports included)"),
            ("model_s", "  in it: Bundle.report (the model's work)"),
            ("after_s", "  in it: the rest (printing, interpreter exit)"),
            ("replica_s", "Serve LLM replica: process start to first answer"),
            ("replica_cpu_s", "  its CPU seconds (its exit included)"),
            ("replica_ready_s", "  in it: imports + LanguageModel() + load (ready to serve)"),
            ("replica_first_s", "  in it: the first report request (the model's work)"),
            ("floor_s", f"bare `import torch, {floor_module}, vector_quantize_pytorch, tokenizers`"),
            ("floor_cpu_s", "  its CPU seconds")]
    header = ["measure"] + [t.label for t in trees]
    table = [[label] + [_spread(t.samples[k]) if t.samples.get(k) else "" for t in trees] for k, label in keys]
    ours = trees[0]
    cli, model = ours.med("cli_s"), ours.med("model_s")
    lines = [
        f"Bundle: {bundle_desc}; {repeat} repeat(s), each in fresh interpreters (median, range); children "
        + (f"with OMP_NUM_THREADS={threads}." if threads > 0 else "with the environment's threads."),
        "",
        markdown_table(header, table),
        "",
        f"Cold start / model work: CLI {cli / model:.1f}x, Serve replica "
        f"{ours.med('replica_s') / ours.med('replica_first_s'):.1f}x.",
    ]
    for t in trees:
        if t.imports:
            lines += ["", f"Largest imports of `python -X importtime -m mavilt report` ({t.label}; cumulative by "
                          f"top-level package, overlapping; all imports {fmt(t.import_total_s, 's')}, a lower bound):",
                      "",
                      markdown_table(["package", "seconds", "its largest entry", "imported by"],
                                     [[f"`{p}`", fmt(s), f"`{e}`", f"`{by}`" if by else "a function at run time (lazy)"]
                                      for p, s, e, by in t.imports])]
    lines += [
        "",
        "What remains: the CLI imports nothing heavy of its own (`--help`, argument errors and unreadable inputs "
        "finish without torch; `tests/test_bench_startup.py` keeps it so). Nearly all of the cold start is torch "
        "and transformers' model module for the bundle's LLM, which imports at module level `torch._dynamo` "
        "(masking_utils), `torch.distributed.tensor` with sympy (sharding utilities), scipy.optimize (object-"
        "detection losses) and accelerate (with boto3) when installed; `vector_quantize_pytorch` adds einx. "
        "They load whichever transformers entry point is used (the Llama class or the Auto classes cost the "
        "same), so only a lighter environment (a serving image without accelerate or scipy) or another model "
        "implementation would cut them.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="model bundle (default: runs/demo/stage2/bundle if present, else a tiny one)")
    ap.add_argument("--repeat", type=int, help="fresh-process runs of each measurement (default 5; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="what benchmarks/run_all.py runs: 1 repeat, < 60 s")
    ap.add_argument("--before", metavar="REF", help="also measure a checkout of this git ref (e.g. HEAD)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the children (0: the environment's)")
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)

    with tempfile.TemporaryDirectory(prefix="mavilt-startup-") as tmp_:
        tmp = Path(tmp_)
        bundle, bundle_desc = _bundle(args.bundle, tmp)
        image = _image(bundle, tmp)
        floor_module = _model_module(bundle)
        trees = [Tree("this tree", ROOT)]
        worktree = None
        try:
            if args.before:
                worktree = _worktree(args.before, tmp)
                trees.append(Tree(f"`{args.before}`", worktree))
            if not args.quick:  # warm the page cache (torch's libraries) so the first timed run is not the outlier
                measure_floor(Tree("warm-up", ROOT), floor_module, args.threads)
            for i in range(repeat):
                for t in trees:  # interleaved: a burst of load hits every tree alike
                    measure_cli(t, image, bundle, args.threads, importtime=i == 0)
                    measure_replica(t, bundle, args.threads)
                measure_floor(trees[0], floor_module, args.threads)
        finally:
            if worktree is not None:
                _remove_worktree(worktree)
        if len(trees) > 1:
            for k in ("floor_s", "floor_cpu_s"):  # the same libraries: measured once
                trees[1].samples[k] = trees[0].samples[k]

    rows = build_rows(trees[0], trees[1] if len(trees) > 1 else None)
    return result("startup", rows, details(trees, bundle_desc, floor_module, args.threads, repeat),
                  mode="quick" if args.quick else "full", repeat=repeat)


if __name__ == "__main__":
    main()
