"""`make bench`: run the CPU benchmarks one after another, then write `benchmarks/RESULTS.md` and the README's
benchmark table from their JSON result lines (never typed by hand).

    python benchmarks/run_all.py                   # all of them, about 5 minutes on 2 cores (at most 10)
    python benchmarks/run_all.py generation data   # some of them; the others' rows are kept from RESULTS.json

Each benchmark runs in its own process (a fresh interpreter: no warm caches or Ray instance shared between
them) with the arguments below, sized so the whole run fits 10 minutes on the CI machine's 2 cores. The raw
result lines are kept in `benchmarks/RESULTS.json`, so running a subset updates only its own sections.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_JSON = HERE / "RESULTS.json"
README = ROOT / "README.md"
START, END = "<!-- bench:start (written by benchmarks/run_all.py) -->", "<!-- bench:end -->"

# name -> (script, arguments sized for the 10-minute budget, seconds it may take before it is stopped)
BENCHMARKS: dict[str, tuple[str, list[str], int]] = {
    "generation": ("generation.py", [], 150),
    "training": ("training.py", [], 200),
    "data": ("data.py", ["--quick"], 90),
    "memory": ("memory.py", ["--quick"], 180),
    "startup": ("startup.py", ["--quick"], 90),
    "prepare_dicom": ("prepare.py", ["--num", "120", "--height", "2048", "--width", "2048"], 180),
}
ORDER = ["generation", "training", "data", "startup", "memory", "prepare_dicom"]


def run_one(name: str) -> dict:
    script, args, limit = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *args]
    print(f"[bench] {name}: {' '.join(cmd[1:])} (at most {limit} s)", flush=True)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"[bench] {name}: stopped after {limit} s", flush=True)
        return {"benchmark": name, "error": f"stopped after {limit} s", "rows": []}
    seconds = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"[bench] {name}: failed (exit {proc.returncode}): " + " / ".join(tail), flush=True)
        return {"benchmark": name, "error": f"exit {proc.returncode}: {' / '.join(tail)}", "rows": []}
    out = json.loads(lines[-1])
    out["seconds"] = round(seconds, 1)
    for r in out.get("rows", []):
        verdict = "" if r.get("met") is None else (" (met)" if r["met"] else " (MISSED)")
        ratio = f" ratio {r['ratio']}x" if r.get("ratio") is not None else ""
        print(f"[bench] {name}: {r['measure']}: {r['ours']}{ratio} {r.get('target', '')}{verdict}", flush=True)
    print(f"[bench] {name}: done in {seconds:.0f} s", flush=True)
    return out


def summary_table(results: list[dict]) -> str:
    lines = ["| area | measure | ours | against | ratio | target | |", "|---|---|---|---|---|---|---|"]
    for res in results:
        if res.get("error"):
            lines.append(f"| {res['benchmark']} | (did not finish: {res['error']}) | | | | | |")
        for r in res.get("rows", []):
            ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3g}x"
            verdict = "" if r.get("met") is None else ("met" if r["met"] else "**missed**")
            lines.append(f"| {r['area']} | {r['measure']} | {r['ours']} | {r.get('reference', '')} | {ratio} | "
                         f"{r.get('target', '')} | {verdict} |")
    return "\n".join(lines)


def write_results(results: list[dict], wall_s: float | None) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = next((r["machine"] for r in results if r.get("machine")), {})
    machine = (f"{m.get('cores')} cores ({m.get('cpu')}), torch {m.get('torch')}"
               + (f", {m['cuda']}" if m.get("cuda") else ", no GPU")) if m else "unknown"
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`benchmarks/run_all.py`) on {when}; machine: {machine}."
        + (f" The run took {wall_s / 60:.1f} minutes." if wall_s else ""),
        "Ratios are measured side by side in one process; absolute figures are context (the machine is shared).",
        "",
        summary_table(results),
        "",
    ]
    body = []
    for res in results:
        body += [f"## {res['benchmark']}", ""]
        if res.get("error"):
            body += [f"Did not finish: {res['error']}", ""]
            continue
        if res.get("details"):
            body += [res["details"], ""]
        mm = res.get("machine", {})
        body += [f"_{res.get('seconds', '?')} s; load average {mm.get('load_avg')}; torch threads "
                 f"{mm.get('torch_threads')}._", ""]
    RESULTS_MD.write_text("\n".join(head + body))
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    if README.is_file():
        text = README.read_text()
        if START in text and END in text:
            a, b = text.index(START) + len(START), text.index(END)
            table = f"\n_From `benchmarks/RESULTS.md` ({when}, {machine})._\n\n{summary_table(results)}\n"
            README.write_text(text[:a] + table + text[b:])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(ORDER)})")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}: choose among {', '.join(ORDER)}")
    names = args.names or ORDER
    kept = {}
    if args.names and RESULTS_JSON.is_file():
        kept = {r["benchmark"]: r for r in json.loads(RESULTS_JSON.read_text())}
    t = time.perf_counter()
    fresh = {name: run_one(name) for name in names}
    results = [fresh.get(n) or kept.get(n) for n in ORDER if fresh.get(n) or kept.get(n)]
    wall = time.perf_counter() - t
    write_results(results, wall if not args.names else None)
    print(f"[bench] wrote {RESULTS_MD.relative_to(ROOT)} in {wall / 60:.1f} minutes", flush=True)
    return results


if __name__ == "__main__":
    main()
