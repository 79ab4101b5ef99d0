"""Model-server throughput and latency on this machine.

1. A MiniLM sequence classifier behind ``airflow-llmops serve``, with dynamic batching (max 32 texts, 5 ms) and
   without (max_batch_size=1: one forward pass per request, the same server otherwise): requests/s and p50/p95
   latency at 1, 8 and 32 concurrent clients (closed loop, one text a request). Goal: >= 3x at 32.
2. The router's own cost per request: an ``echo://`` variant (no model) through the full server (routing,
   batcher, worker thread, metrics, request log) against a bare FastAPI app with the same route, at concurrency 1.

The load generator shares the machine's cores with the server: absolute numbers are a lower bound.

    .venv/bin/python bench/serve.py [--seconds 8] [--concurrency 1,8,32] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = (
    "hello how are you today I would like a pizza with extra cheese what is the price of bread my bank account "
    "balance please tell me a joke about computers the weather is nice and sunny can you help me book a table "
    "for two tonight interest rates went up again this year good morning nice to meet you"
)
WORDS = SENTENCES.split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 30))) for _ in range(n)]


def build_classifier(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from airflow_llmops.ml.models import resolve_model_path

    base = resolve_model_path("all-MiniLM-L6-v2")
    labels = {0: "greetings", 1: "food", 2: "money"}
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, id2label=labels)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def start(work: Path, name: str, argv: list[str]) -> tuple[Any, str]:
    from airflow_llmops.processes import ManagedProcess, free_port, http_ok

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = ManagedProcess(name, [*argv, "--port", str(port)], work / f"{name}.log", env=env).start()
    url = f"http://127.0.0.1:{port}"
    process.wait_until(lambda: http_ok(f"{url}/readyz"), timeout=180, what="readiness", interval=0.5)
    return process, url


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "airflow_llmops.cli", "serve", "--host", "127.0.0.1", *args]


async def load(url: str, concurrency: int, seconds: float, pool: list[str]) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the last one answered, for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, trust_env=False) as client:

        async def worker(seed: int, until: float, record: bool) -> None:
            nonlocal errors
            i = seed
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                response = await client.post("/v1/classify", json={"inputs": pool[i % len(pool)]})
                if record:
                    latencies.append(time.perf_counter() - t0)
                    errors += response.status_code != 200
                i += concurrency

        warm = time.perf_counter() + min(2.0, seconds / 4)
        await asyncio.gather(*(worker(c, warm, False) for c in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, t0 + seconds, True) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50_ms": q[49] * 1000,
        "p95_ms": q[94] * 1000,
    }


def bare_app() -> Any:
    """The same route shape with nothing behind it: what FastAPI + uvicorn cost on their own."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Body(BaseModel):
        inputs: str | list[str]

    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/classify")
    async def classify(body: Body) -> dict[str, Any]:
        items = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        results = [{"label": "echo", "score": 1.0, "scores": {"echo": 1.0}} for _ in items]
        return {"variant": "bare", "results": results, "usage": {"prompt_tokens": 0}}

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    parser.add_argument("--bare-app", action="store_true", help=argparse.SUPPRESS)  # internal: run the bare app
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_app:
        import uvicorn

        uvicorn.run(bare_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        return 0

    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="llmops-bench-serve-"))
    model = build_classifier(work / "classifier")
    pool = texts(512)
    threads = ["--torch-threads", str(args.torch_threads)]
    clf = ["--model", f"clf={model}", *threads]
    setups = {
        "batched": serve_argv(*clf, "--max-batch-size", "32", "--max-batch-delay-ms", "5"),
        "unbatched": serve_argv(*clf, "--max-batch-size", "1", "--max-batch-delay-ms", "0"),
    }
    rows: dict[str, Any] = {"throughput": {}, "router": {}}
    for name, argv in setups.items():  # one server at a time: they would share the same two cores
        process, url = start(work, name, argv)
        try:
            rows["throughput"][name] = [asyncio.run(load(url, c, args.seconds, pool)) for c in levels]
        finally:
            process.stop()

    router_setups = {
        "server, echo variant": serve_argv(
            "--model", "echo=echo://", "--max-batch-delay-ms", "0", "--request-log", str(work / "requests")
        ),
        "bare FastAPI app": [sys.executable, __file__, "--bare-app"],
    }
    for name, argv in router_setups.items():
        process, url = start(work, name.split(",")[0].replace(" ", "-"), argv)
        try:
            rows["router"][name] = asyncio.run(load(url, 1, max(3.0, args.seconds / 2), pool))
        finally:
            process.stop()

    print(f"{'server':<12} {'clients':>7} {'req/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'errors':>7}")
    for name, results in rows["throughput"].items():
        for r in results:
            print(
                f"{name:<12} {r['concurrency']:>7} {r['rps']:>9.1f} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f} "
                f"{r['errors']:>7}"
            )
    batched = {r["concurrency"]: r["rps"] for r in rows["throughput"]["batched"]}
    unbatched = {r["concurrency"]: r["rps"] for r in rows["throughput"]["unbatched"]}
    rows["speedup"] = {c: batched[c] / unbatched[c] for c in levels}
    print("batched / unbatched req/s: " + ", ".join(f"{c} clients {s:.2f}x" for c, s in rows["speedup"].items()))
    server, bare = rows["router"]["server, echo variant"], rows["router"]["bare FastAPI app"]
    rows["router_overhead_ms"] = server["p50_ms"] - bare["p50_ms"]
    print(
        f"router overhead at 1 client (p50): {rows['router_overhead_ms']:.2f} ms "
        f"(echo variant {server['p50_ms']:.2f} ms vs bare FastAPI {bare['p50_ms']:.2f} ms)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "seconds_per_level": args.seconds}
    args.out.write_text(json.dumps({**meta, **rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
