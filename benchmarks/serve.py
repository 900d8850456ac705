"""Serving throughput and latency: the Serve application of ``serve/app.py`` with batching (``@serve.batch`` at
the preset's ``serve.max_batch_size``) against the same application without (``serve.max_batch_size=1``), driven
over HTTP by an asyncio client (closed loop: C clients, each sending its next request when the last is answered)
at two concurrency levels. Same bundle, same requests, same replicas (autoscaling off, so only batching differs).

Prints a table, the ratios (throughput batched / unbatched, p99 latency batched / unbatched) and one JSON line.
Target: at least 3x the throughput at no worse p99 at the higher concurrency level.

    python benchmarks/serve.py                                   # the demo's bundle (after `make demo`)
    python benchmarks/serve.py --bundle runs/x/stage2/bundle --concurrency 4 32 --requests 96
    python benchmarks/serve.py --endpoint synthesize             # report text -> image instead of image -> report
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # serve/app.py is imported by path, as `serve run` does from the checkout

log = logging.getLogger("benchmarks.serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bodies(endpoint: str, n: int, image_size: int, seed: int) -> list[dict]:
    """``n`` distinct requests from the synthetic source (phantom CXRs as PNG, their findings as text), as
    keyword arguments of ``httpx.AsyncClient.post``."""
    from mavilt.data.synthetic.source import make_rows

    rows = make_rows(n, seed=seed, image_size=image_size)
    if endpoint == "report":
        return [{"url": "/v1/report", "files": {"image": ("cxr.png", r["image"], "image/png")}} for r in rows]
    return [{"url": "/v1/synthesize", "json": {"text": r["findings"] or "No acute cardiopulmonary process.",
                                               "seed": i}} for i, r in enumerate(rows)]


async def drive(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body once with ``concurrency`` clients: throughput, latency percentiles and failures."""
    import httpx

    latencies: list[float] = []
    failures: dict[int, int] = {}
    queue = list(reversed(bodies))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            t = time.perf_counter()
            r = await http.post(**body)
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                failures[r.status_code] = failures.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"requests": len(bodies), "concurrency": concurrency, "wall_s": round(wall, 2),
            "throughput_rps": round(len(bodies) / wall, 3), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3), "failures": failures}


def measure(mode: str, args, ckpt, url: str) -> list[dict]:
    """Deploy the application in one mode, warm it up, and drive it at each concurrency level."""
    from ray import serve

    from mavilt.config import load_config
    from serve.app import build

    overrides = [*args.set, "serve.llm.min_replicas=1", "serve.llm.max_replicas=1",
                 f"serve.max_queued_requests={4 * max(args.concurrency)}"]
    if mode == "unbatched":
        overrides.append("serve.max_batch_size=1")
    cfg = load_config(args.config, overrides)
    log.info("%s: deploying (max_batch_size=%d)", mode, cfg.serve.max_batch_size)
    serve.run(build(cfg, ckpt.uri), name="bench", route_prefix="/")
    size = ckpt.image_size
    warm = request_bodies(args.endpoint, 2 * max(args.concurrency), size, seed=999)
    asyncio.run(drive(url, warm, max(args.concurrency)))  # every replica has loaded its part and run its path
    out = []
    for c in args.concurrency:
        bodies = request_bodies(args.endpoint, args.requests, size, seed=c)
        r = {"mode": mode, "max_batch_size": cfg.serve.max_batch_size, **asyncio.run(drive(url, bodies, c))}
        log.info("%s", r)
        out.append(r)
    serve.delete("bench")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="a model bundle or a sweep's best.json (default: as the server resolves it: "
                                    "$MAVILT_CHECKPOINT, then runs/demo/stage2/bundle)")
    p.add_argument("--config", default="tiny", help="the preset whose serve section sets resources and batching")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (serve.*)")
    p.add_argument("--endpoint", choices=("report", "synthesize"), default="report")
    p.add_argument("--concurrency", type=int, nargs=2, default=[4, 32], metavar=("LOW", "HIGH"))
    p.add_argument("--requests", type=int, default=160, help="requests per concurrency level and mode")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if args.requests < max(args.concurrency):
        p.error("--requests must be at least the higher concurrency level")

    from mavilt.errors import MavilError
    from mavilt.raycluster import ensure_ray
    from mavilt.serving.models import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(args.bundle)
    except MavilError as e:
        raise SystemExit(f"benchmarks/serve.py: {e}") from None
    os.environ.setdefault("RAY_worker_niceness", "0")  # Serve's replicas compete with the client on equal terms
    ensure_ray()
    import ray
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    try:
        rows = measure("batched", args, ckpt, url) + measure("unbatched", args, ckpt, url)
    finally:
        serve.shutdown()
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    ratios = {}
    for c in args.concurrency:
        b, u = by[("batched", c)], by[("unbatched", c)]
        ratios[str(c)] = {"throughput": round(b["throughput_rps"] / u["throughput_rps"], 2),
                          "p50": round(b["p50_s"] / u["p50_s"], 2), "p99": round(b["p99_s"] / u["p99_s"], 2)}
    hi = str(max(args.concurrency))
    met = ratios[hi]["throughput"] >= 3 and ratios[hi]["p99"] <= 1 and not any(r["failures"] for r in rows)

    print(f"\nServing {args.endpoint} ({ckpt.id}, preset {args.config}, {int(ray.cluster_resources().get('CPU', 0))} "
          f"CPUs, {args.requests} requests per row)\n")
    print("| mode | max batch | concurrency | req/s | p50 s | p99 s | failures |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['max_batch_size']} | {r['concurrency']} | {r['throughput_rps']:.2f} | "
              f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['failures'] or '-'} |")
    print()
    for c, q in ratios.items():
        print(f"concurrency {c}: batched/unbatched throughput {q['throughput']:.2f}x, p50 {q['p50']:.2f}x, "
              f"p99 {q['p99']:.2f}x")
    print(f"target (concurrency {hi}: >= 3x throughput, p99 ratio <= 1): {'met' if met else 'MISSED'}\n")
    result = {"benchmark": "serve", "endpoint": args.endpoint, "checkpoint": ckpt.id, "preset": args.config,
              "rows": rows, "ratios": ratios, "target_met": met, "cores": os.cpu_count(),
              "load_avg_before": [round(x, 2) for x in load_before]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
