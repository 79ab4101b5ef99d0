"""Served generation throughput with continuous batching, against Hugging Face ``generate`` one request at a time.

A small GPT-2 built from a config (4 layers x 256 wide, 4 heads, 512 positions, a byte-level BPE tokenizer
trained on a few sentences; random weights with EOS never winning, so every generation runs to ``max_tokens``)
is served by ``airflow-llmops serve`` (one decode loop: requests that arrive together decode together, up to
``--max-decode-batch-size``). Closed-loop clients stream ``/v1/completions`` (greedy, fixed ``max_tokens``) at
1, 8 and 32 concurrent clients: generated tokens/s, time to first token (p50/p95, the first text chunk) and
request latency. The baseline runs ``model.generate`` in-process, one prompt after another (greedy, the same
``max_new_tokens``, the same torch threads), TTFT taken by a streamer at the first new token. Goal: >= 3x the
baseline's tokens/s at 32 clients.

The load generator shares the machine's cores with the server: absolute numbers are a lower bound.

    .venv/bin/python bench/generation.py [--seconds 10] [--concurrency 1,8,32] [--max-tokens 64]
        [--out bench/results/generation.json]
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
sys.path.insert(0, str(ROOT / "bench"))
SENTENCES = (
    "hello how are you today I would like a pizza with extra cheese what is the price of bread my bank account "
    "balance please tell me a joke about computers the weather is nice and sunny can you help me book a table "
    "for two tonight interest rates went up again this year good morning nice to meet you"
)
WORDS = SENTENCES.split()
LAYERS, WIDTH, HEADS, CONTEXT = 4, 256, 4, 512


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 30))) for _ in range(n)]


def build_lm(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from airflow_llmops.ml.training.models import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(prompts(400, seed=1), CONTEXT)
    eos, pad = tokenizer.convert_tokens_to_ids([tokenizer.eos_token, tokenizer.pad_token])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # EOS never wins: every generation runs to max_tokens
        model.transformer.wte.weight[eos] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[94]


async def load(url: str, concurrency: int, seconds: float, pool: list[str], max_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients, each streaming its next completion when the last one ended, for ``seconds``."""
    ttfts: list[float] = []
    latencies: list[float] = []
    tokens = errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, trust_env=False) as client:

        async def one(prompt: str) -> tuple[float | None, float, int]:
            body = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            first, made = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return None, time.perf_counter() - t0, -1
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        made = chunk["usage"]["completion_tokens"]
            return first, time.perf_counter() - t0, made

        async def worker(seed: int, until: float, record: bool) -> None:
            nonlocal tokens, errors
            i = seed
            while time.perf_counter() < until:
                first, latency, made = await one(pool[i % len(pool)])
                i += concurrency
                if not record:
                    continue
                if made < 0:
                    errors += 1
                    continue
                tokens += made
                latencies.append(latency)
                if first is not None:
                    ttfts.append(first)

        warm = time.perf_counter() + min(2.0, seconds / 4)
        await asyncio.gather(*(worker(c, warm, False) for c in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, t0 + seconds, True) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    p50, p95 = quantiles(sorted(ttfts))
    l50, l95 = quantiles(sorted(latencies))
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": p50 * 1000,
        "ttft_p95_ms": p95 * 1000,
        "latency_p50_ms": l50 * 1000,
        "latency_p95_ms": l95 * 1000,
    }


def baseline(folder: Path, pool: list[str], seconds: float, max_tokens: int, threads: int) -> dict[str, Any]:
    """``model.generate`` in this process, one prompt at a time (greedy, KV cache, the same prompts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.at is None:  # the first call is the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    ttfts: list[float] = []
    latencies: list[float] = []
    tokens, i = 0, 0

    def run(prompt: str) -> tuple[float, float, int]:
        ids = tokenizer(prompt, return_tensors="pt")
        streamer = FirstToken()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        end = time.perf_counter()
        return (streamer.at or end) - t0, end - t0, int(out.shape[1] - ids["input_ids"].shape[1])

    warm = time.perf_counter() + min(2.0, seconds / 4)
    while time.perf_counter() < warm:
        run(pool[i % len(pool)])
        i += 1
    t0 = time.perf_counter()
    while time.perf_counter() < t0 + seconds:
        first, latency, made = run(pool[i % len(pool)])
        i += 1
        ttfts.append(first)
        latencies.append(latency)
        tokens += made
    wall = time.perf_counter() - t0
    p50, p95 = quantiles(sorted(ttfts))
    l50, l95 = quantiles(sorted(latencies))
    return {
        "concurrency": 1,
        "requests": len(latencies),
        "errors": 0,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": p50 * 1000,
        "ttft_p95_ms": p95 * 1000,
        "latency_p50_ms": l50 * 1000,
        "latency_p95_ms": l95 * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-decode-batch-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generation.json")
    args = parser.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="llmops-bench-generation-"))
    folder = build_lm(work / "lm")
    pool = prompts(256)
    rows: dict[str, Any] = {}
    rows["hf_generate"] = baseline(folder, pool, args.seconds, args.max_tokens, args.torch_threads)
    argv = [
        sys.executable, "-m", "airflow_llmops.cli", "serve", "--host", "127.0.0.1", "--model", f"lm={folder}",
        "--torch-threads", str(args.torch_threads), "--max-decode-batch-size", str(args.max_decode_batch_size),
    ]  # fmt: skip
    from serve import start  # bench/serve.py: the server process, started and ready

    process, url = start(work, "serve", argv)
    try:
        rows["served"] = [asyncio.run(load(url, c, args.seconds, pool, args.max_tokens)) for c in levels]
    finally:
        process.stop()

    base = rows["hf_generate"]["tokens_per_s"]
    header = f"{'setup':<26} {'clients':>7} {'tokens/s':>9} {'vs HF':>6} {'TTFT p50':>9} {'TTFT p95':>9} "
    print(header + f"{'lat p50':>9} {'lat p95':>9} {'errors':>6}")
    table = [("HF generate, one at a time", rows["hf_generate"]), *(("served (batched)", r) for r in rows["served"])]
    for name, r in table:
        print(
            f"{name:<26} {r['concurrency']:>7} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>5.2f}x "
            f"{r['ttft_p50_ms']:>7.1f}ms {r['ttft_p95_ms']:>7.1f}ms {r['latency_p50_ms']:>7.0f}ms "
            f"{r['latency_p95_ms']:>7.0f}ms {r['errors']:>6}"
        )
    rows["speedup_vs_hf"] = {r["concurrency"]: r["tokens_per_s"] / base for r in rows["served"]}
    top = max(levels)
    speedup = rows["speedup_vs_hf"][top]
    verdict = "goal met" if speedup >= 3 else f"goal missed by {3 - speedup:.2f}x"
    print(f"served tokens/s at {top} clients / HF generate one at a time: {speedup:.2f}x (goal >= 3x: {verdict})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds_per_level": args.seconds,
        "max_tokens": args.max_tokens,
        "model": f"GPT-2 {LAYERS} layers x {WIDTH}, {HEADS} heads, context {CONTEXT}, random weights",
        "torch_threads": args.torch_threads,
        "max_decode_batch_size": args.max_decode_batch_size,
    }
    args.out.write_text(json.dumps({**meta, **rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
