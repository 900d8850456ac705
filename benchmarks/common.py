"""What every benchmark shares: its result line, the rows of `benchmarks/RESULTS.md`, and timing helpers.

A benchmark's ``main(argv)`` measures its side-by-side ratios and ends by printing one JSON line made by
:func:`result` (also returned): ``{"benchmark": name, "rows": [...], "details": markdown, ...}``. Each row is one
line of the summary table: what was measured, our figure, the reference it is compared with (the anchors' way,
a bare loop, or the machine's limit), the ratio between them, the target and whether it holds.
``benchmarks/run_all.py`` (``make bench``) runs them one after another and writes ``RESULTS.md`` and the README's
table from these lines; nothing in either is typed by hand.

Absolute times are context only: these machines are noisy, so each figure that matters is a ratio of two
measurements taken in the same process, interleaved where that is cheap.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass
class Row:
    """One line of the summary table."""

    area: str  # generation, training, data, memory, start-up, serving, gpu
    measure: str  # what was measured, with its unit
    ours: str  # our figure, formatted
    reference: str = ""  # what it is compared with, and its figure
    ratio: float | None = None  # ours against the reference, in the direction the target states
    target: str = ""  # e.g. ">= 1.5x", "<= 2x", "<= 10%"; empty: context only
    met: bool | None = None  # None where there is no target

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["ratio"] is not None:
            d["ratio"] = round(float(d["ratio"]), 3)
        return d


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, load, torch and its threads."""
    import torch

    return {
        "cores": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def result(name: str, rows: list[Row], details: str = "", **extra: Any) -> dict[str, Any]:
    """Print and return the benchmark's JSON result line."""
    out = {"benchmark": name, "rows": [r.as_dict() for r in rows], "details": details.strip(),
           "machine": machine(), **extra}
    print(json.dumps(out), flush=True)
    return out


def timed(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], *, repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in turn (a, b, a, b, ...) so that a burst of load on a shared
    machine hits both sides alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def training_flops_per_token(model: Any, seq_len: float, head_fraction: float = 1.0) -> float:
    """The FLOPs a token costs in training: 6 x the parameters of every Linear it passes (the output head only
    at the ``head_fraction`` of tokens it runs for; the input embedding is a lookup) plus attention's
    12 x layers x width x sequence length (forward QK^T and AV, and their backward)."""
    import torch

    head = model.get_output_embeddings()
    in_head = {id(m) for m in head.modules()}  # a PEFT wrapper's base layer is the head too
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in in_head)
    c = model.config
    return 6 * (body + head_fraction * head.weight.numel()) + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def fmt(x: float, unit: str = "") -> str:
    """A figure with three significant digits and its unit."""
    if x == 0:
        s = "0"
    elif abs(x) >= 1000:
        s = f"{x:,.0f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
