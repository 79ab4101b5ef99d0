"""Continuous batching in the model server: concurrent generations decode together (a real server process, the
``openai`` client), each with its own limits, and give exactly what they give alone."""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import require_module
from test_serving_models import Server, build_tiny_lm, start_server

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
CONTEXT = 512
PROMPTS = [
    "hello there, how are you",
    "I would like a pizza",
    "How much money is in",
    "Good morning!",
    "The soup was",
    "Interest rates went up again this year and the bank",
]


def build_chaotic_lm(root: Path) -> Path:
    """The tiny GPT-2's tokenizer with a 512-position, 2-layer GPT-2 whose random weights are large, so each
    generation depends on its whole context (a padding or position mistake changes the tokens), and EOS never
    wins (generations run to their limits)."""
    import torch
    from transformers import GPT2LMHeadModel

    from airflow_llmops.ml.training.models import tiny_gpt2_config

    folder = root / "chaotic-lm"
    tiny = build_tiny_lm()
    base = GPT2LMHeadModel.from_pretrained(tiny)
    config = tiny_gpt2_config(
        vocab_size=base.config.vocab_size,
        max_seq_length=CONTEXT,
        eos_id=base.config.eos_token_id,
        pad_id=base.config.pad_token_id,
    )
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
        model.transformer.wte.weight[config.eos_token_id] = 0.0
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny / name).is_file():
            shutil.copy(tiny / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chaotic_lm(tmp_path_factory.mktemp("chaotic-lm"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lm_dir: Path) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve-batching")
    lm = lm_dir
    server = start_server(work, "--model", f"lm={lm}", "--max-decode-batch-size", "8", "--torch-threads", "1")
    yield server
    server.process.stop()


def _metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'^(llmops_[a-z_]+)(\{[^}]*variant="lm"[^}]*\})? ([0-9.e+-]+)$', line)
        if match and match.group(2) is not None:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            key = match.group(1) + (f"[le={labels['le']}]" if "le" in labels else "")
            out[key] = float(match.group(3))
    return out


def _complete(client: Any, request: dict[str, Any]) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one request, streamed or not."""
    if request.get("stream"):
        text, finish = "", ""
        stream = client.completions.create(model="lm", temperature=0, **request)
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, -1
    answer = client.completions.create(model="lm", temperature=0, **request)
    return answer.choices[0].text, answer.choices[0].finish_reason, answer.usage.completion_tokens


def test_concurrent_generations_decode_together_and_match_their_single_results(server: Server) -> None:
    openai = require_module("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    requests: list[dict[str, Any]] = [{"prompt": p, "max_tokens": 32} for p in PROMPTS]
    requests.append({"prompt": PROMPTS[0], "max_tokens": 2})  # finishes after 2 tokens while the others go on
    requests.append({"prompt": "do you like pizza?", "max_tokens": 32, "stream": True})
    # A stop sequence taken from the middle of a greedy answer: that request stops there, the others go on.
    full = _complete(client, {"prompt": PROMPTS[1], "max_tokens": 32})[0]
    stop = next(full[i : i + 2] for i in range(6, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    requests.append({"prompt": PROMPTS[1], "max_tokens": 32, "stop": [stop]})
    alone = [_complete(client, r) for r in requests]  # one at a time: the batch holds one sequence
    before = _metrics(server)

    barrier = threading.Barrier(len(requests))

    def together(request: dict[str, Any]) -> tuple[str, str, int]:
        barrier.wait()
        return _complete(client, request)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        batched = list(pool.map(together, requests))
    after = _metrics(server)

    assert batched == alone  # token-identical greedy text, finish reasons and counts, streamed one included
    assert all(r[1:] == ("length", 32) for r in batched[: len(PROMPTS)])
    assert batched[len(PROMPTS)][1:] == ("length", 2)
    assert batched[-2][1] == "length" and batched[-2][0]
    text, finish, tokens = batched[-1]
    assert finish == "stop" and stop not in text and full.startswith(text) and tokens < 32
    # The decode loop ran forward passes over several sequences at once, and its series are there.
    single = after["llmops_batch_size_bucket[le=1.0]"] - before["llmops_batch_size_bucket[le=1.0]"]
    passes = after["llmops_batch_size_count"] - before["llmops_batch_size_count"]
    assert passes > single, "no forward pass held more than one sequence"
    assert after["llmops_batch_size_sum"] - before["llmops_batch_size_sum"] > passes * 2
    generated = after["llmops_generated_tokens_total"] - before["llmops_generated_tokens_total"]
    assert generated == 32 * len(PROMPTS) + 2 + 32 + tokens
    assert after["llmops_time_to_first_token_seconds_count"] - before["llmops_time_to_first_token_seconds_count"] == 9
    assert after["llmops_inter_token_latency_seconds_count"] > before["llmops_inter_token_latency_seconds_count"]
    assert after["llmops_decode_tokens_per_second_count"] > before["llmops_decode_tokens_per_second_count"]
    _wait_idle(server)


def _wait_idle(server: Server) -> None:
    """The batch gauge goes back to 0 once the loop finished its last step (just after the answers went out)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = _metrics(server)
        if now["llmops_decode_batch_size"] == 0 and now["llmops_decode_waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the decode loop did not go idle: {now}")


def test_a_cancelled_stream_leaves_the_batch_and_the_others_finish(server: Server) -> None:
    long = {"prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True}
    others = [{"prompt": p, "max_tokens": 120, "temperature": 0} for p in PROMPTS[:3]]
    sampled = {"prompt": PROMPTS[3], "max_tokens": 40, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    url = f"{server.url}/v1/completions"
    expected = [httpx.post(url, json=r, timeout=TIMEOUT).json() for r in [*others, sampled]]
    before = _metrics(server)

    def cancel_after_first_chunk() -> int:
        with httpx.stream("POST", url, json=long, timeout=TIMEOUT) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    return stream.status_code  # leaving the block closes the connection mid-stream
        return -1

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        cancelled = pool.submit(cancel_after_first_chunk)
        time.sleep(0.05)
        answers = [pool.submit(httpx.post, url, json=r, timeout=TIMEOUT) for r in [*others, sampled]]
        assert cancelled.result() == 200
        results = [a.result().json() for a in answers]
    # Greedy and seeded sampling alike: unchanged by the batch and by the stream that left it.
    assert [r["choices"] for r in results] == [r["choices"] for r in expected]
    _wait_idle(server)
    after = _metrics(server)
    generated = after["llmops_generated_tokens_total"] - before["llmops_generated_tokens_total"]
    ran = generated - sum(r["usage"]["completion_tokens"] for r in results)  # the cancelled stream's tokens
    assert 1 <= ran < 400, f"the cancelled stream made {ran} tokens"
    again = httpx.post(url, json=others[0], timeout=TIMEOUT).json()
    assert again["choices"] == expected[0]["choices"]


def test_the_decode_loop_in_process_gives_each_sequence_its_single_result(lm_dir: Path) -> None:
    """Staggered arrivals with mixed limits, in both modes: merging newcomers' caches into the running batch, and
    the fallback for caches that cannot be merged (newcomers wait for the batch to finish)."""
    from airflow_llmops.serving.models import GenerationParams, HFCausalLM, load_model
    from airflow_llmops.serving.sources import resolve_source

    model = load_model(resolve_source(str(lm_dir)))
    assert isinstance(model, HFCausalLM)
    model.configure_batching(max_batch_size=4)
    params = [
        GenerationParams(
            max_tokens=4 + 3 * i, temperature=0.0 if i % 3 else 0.8, seed=i, stop=("zz",) if i == 2 else ()
        )
        for i in range(len(PROMPTS))
    ]
    alone = [
        model.generate(p, q, on_text=None, cancelled=threading.Event()) for p, q in zip(PROMPTS, params, strict=True)
    ]
    for merge in (True, False):
        model.engine.mergeable = merge
        futures = []
        for prompt, q in zip(PROMPTS, params, strict=True):
            futures.append(model.submit(prompt, q, on_text=None, cancelled=threading.Event()))
            time.sleep(0.002)
        assert [f.result(timeout=TIMEOUT) for f in futures] == alone, f"merge={merge}"
    model.close(drain_s=5)
