"""ONNX causal-LM artifacts (``onnx_dynamic_int8``) are served and evaluated like torch ones: the served model
decodes the KV-cache graph in the shared continuous-batching loop (greedy answers equal
``OnnxCausalPredictor.generate_ids``), with stop tokens, stop strings, streaming, cancellation, seeds and metrics;
a real server process answers chat and completions through the gateway (output PII redaction included); and the
evaluation scores the artifact with the full causal-LM check (perplexity on assistant tokens, generation metrics).

The model is the scripted chat GPT-2 of ``scripted_chat_lm``: its greedy reply is known, and it is sharp enough
that int8 keeps it (checked below, not assumed)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from scripted_chat_lm import QUESTION, build_scripted_chat_lm
from test_serving_models import Server, start_server

pytestmark = pytest.mark.integration

REPLY = "Write to bob@example.com today"
REDACTED = "Write to [EMAIL] today"
ADMIN = "admin-secret"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The scripted chat model (fp32 folder) and its ``onnx_dynamic_int8`` artifact."""
    from airflow_llmops.ml.quantization.methods import quantize_model

    root = tmp_path_factory.mktemp("onnx-chat")
    folder, _ = build_scripted_chat_lm(root / "chat-lm", REPLY)
    quantize_model(folder, "onnx_dynamic_int8", root / "int8")
    return folder, root / "int8"


@pytest.fixture(scope="module")
def served(models: tuple[Path, Path]) -> Iterator[Any]:
    from airflow_llmops.serving.models import load_model
    from airflow_llmops.serving.onnx_generation import OnnxServedCausalLM
    from airflow_llmops.serving.sources import resolve_source

    model = load_model(resolve_source(f"file://{models[1]}"))
    assert isinstance(model, OnnxServedCausalLM) and model.method == "onnx_dynamic_int8"
    yield model
    model.close(drain_s=5.0)


class Recorder:
    """A generation observer that counts what the decode loop reports."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.tokens = 0
        self.lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def batch(self, running: int, waiting: int) -> None:
        self._count("batch")

    def forward(self, sequences: int) -> None:
        self._count("forward")

    def first_token(self, seconds: float) -> None:
        self._count("first_token")

    def next_token(self, seconds: float) -> None:
        self._count("next_token")

    def decode_step(self, tokens: int, seconds: float) -> None:
        self._count("decode_step")

    def generated(self, tokens: int) -> None:
        with self.lock:
            self.tokens += tokens


def _prompt(model: Any) -> str:
    return str(model.chat_prompt([("user", QUESTION)]))


def test_served_greedy_answer_is_the_predictors_and_stops_at_the_role_marker(served: Any) -> None:
    from airflow_llmops.ml.predict import decode
    from airflow_llmops.serving.models import GenerationParams

    prompt = _prompt(served)
    ids = served._encode(prompt, 40)
    # The predictor's own greedy decoding (EOS only) runs past the reply into a fabricated user turn ...
    reference = served.predictor.generate_ids(ids, 40, stop_at_eos=False)
    cut = next(i for i, token in enumerate(reference) if token in served.stop_ids)
    assert decode(served.tokenizer, reference[:cut]) == REPLY  # int8 kept the scripted reply
    assert cut < len(reference) - 1, "the premise: without the role marker as a stop, it rambles on"
    # ... the served model says the same tokens and stops at the shared stop ids (EOS and role markers).
    pieces: list[str] = []
    answer = served.generate(
        prompt, GenerationParams(max_tokens=40, temperature=0.0), on_text=pieces.append, cancelled=threading.Event()
    )
    assert answer.text == REPLY and "".join(pieces) == REPLY
    assert answer.finish_reason == "stop" and answer.completion_tokens == cut
    assert answer.prompt_tokens == len(ids)


def test_requests_decode_together_each_with_its_own_parameters(served: Any) -> None:
    from airflow_llmops.serving.errors import BadRequest
    from airflow_llmops.serving.models import Generation, GenerationParams

    recorder = Recorder()
    served.configure_batching(observer=recorder, max_batch_size=8)
    prompt = _prompt(served)
    greedy = GenerationParams(max_tokens=40, temperature=0.0)
    streams: dict[str, list[str]] = {"stop": [], "plain": []}
    requests: dict[str, tuple[str, GenerationParams, Any]] = {
        "plain": (prompt, greedy, streams["plain"].append),
        "short": (prompt, GenerationParams(max_tokens=2, temperature=0.0), None),
        # The stop string arrives over several tokens: the stream must never show a part of it.
        "stop": (prompt, GenerationParams(max_tokens=40, temperature=0.0, stop=("@example",)), streams["stop"].append),
        "sampled": (prompt, GenerationParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=11), None),
        "other": ("bob", greedy, None),
    }
    futures: dict[str, Future[Generation]] = {
        name: served.submit(p, params, on_text=cb, cancelled=threading.Event())
        for name, (p, params, cb) in requests.items()
    }
    results = {name: future.result(timeout=TIMEOUT) for name, future in futures.items()}
    assert results["plain"].text == REPLY and "".join(streams["plain"]) == REPLY
    assert results["short"].completion_tokens == 2 and results["short"].finish_reason == "length"
    assert REPLY.startswith(results["short"].text) and results["short"].text
    assert results["stop"].text == "Write to bob" and results["stop"].finish_reason == "stop"
    assert "".join(streams["stop"]) == "Write to bob" and not any("@" in piece for piece in streams["stop"])
    # Each request alone gives what it gave in the batch; a seed repeats its sample.
    for name in ("sampled", "other"):
        p, params, _ = requests[name]
        alone = served.generate(p, params, on_text=None, cancelled=threading.Event())
        assert alone.text == results[name].text, name
    assert recorder.calls.get("first_token", 0) >= len(requests)
    assert recorder.calls.get("next_token", 0) > 0 and recorder.calls.get("decode_step", 0) > 0
    assert recorder.tokens >= sum(r.completion_tokens for r in results.values())
    # A client that goes away mid-answer stops its decoding; a prompt over the context is refused up front.
    cancelled = threading.Event()
    gone = served.generate(prompt, greedy, on_text=lambda piece: cancelled.set(), cancelled=cancelled)
    assert gone.completion_tokens < len(served._encode(REPLY, 1))
    with pytest.raises(BadRequest, match="context is 256 tokens"):
        served.generate("bob " * 300, greedy, on_text=None, cancelled=threading.Event())


# ---- a real server process ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[Server]:
    from airflow_llmops.serving.client import ServingClient

    server = start_server(
        tmp_path_factory.mktemp("serve-onnx"),
        "--model",
        f"private={models[1]}",
        "--redact-output-pii",
        "--admin-token",
        ADMIN,
        "--torch-threads",
        "1",
    )
    try:
        ServingClient(server.url, ADMIN).add_variant("open", str(models[1]), weight=0, redact_output_pii=False)
        yield server
    finally:
        server.process.stop()


def _stream(server: Server, path: str, body: dict[str, Any]) -> str:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = []
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            piece = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
            pieces.append(piece or "")
    return "".join(pieces)


def test_server_answers_as_the_evaluation_scored_with_redaction_on_top(
    server: Server, models: tuple[Path, Path], tmp_path: Path
) -> None:
    from airflow_llmops.ml.evaluation import evaluate_model

    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"messages": [json.dumps(conversation)]}).to_parquet(data / "test.parquet")
    evaluated = evaluate_model(models[1], data, generation_rows=1, max_new_tokens=40)
    assert evaluated["samples"][0]["answer"] == REPLY

    def chat(model: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40}

    answer = httpx.post(f"{server.url}/v1/chat/completions", json=chat("open"), timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == REPLY
    assert _stream(server, "/v1/chat/completions", chat("open")) == REPLY
    private = httpx.post(f"{server.url}/v1/chat/completions", json=chat("private"), timeout=TIMEOUT)
    assert private.json()["choices"][0]["message"]["content"] == REDACTED
    assert _stream(server, "/v1/chat/completions", chat("private")) == REDACTED
    prompt = evaluated["samples"][0]["prompt"]
    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "open", "prompt": prompt, "temperature": 0, "max_tokens": 40},
        timeout=TIMEOUT,
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == REPLY
    metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    counted = re.findall(r'^llmops_generated_tokens_total\{[^}]*variant="open"[^}]*\} ([0-9.e+]+)$', metrics, re.M)
    assert counted and float(counted[0]) >= 3 * len(REPLY.split())


# ---- evaluation --------------------------------------------------------------------------------------------------


def test_evaluation_scores_the_onnx_artifact_like_the_full_precision_model(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    from airflow_llmops.ml.evaluation import evaluate_model

    data = tmp_path / "data"
    data.mkdir()
    conversations = [
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}],
        [
            {"role": "user", "content": "bob"},
            {"role": "assistant", "content": "today"},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": REPLY},
        ],
    ]
    pd.DataFrame({"messages": [json.dumps(c) for c in conversations]}).to_parquet(data / "test.parquet")
    fp32, int8 = (evaluate_model(m, data, generation_rows=2, max_new_tokens=40) for m in models)
    assert fp32["task"] == int8["task"] == "chat"
    # Perplexity on the same (assistant) tokens, and the generation metrics on the same greedy answers.
    assert int8["metrics"]["scored_tokens"] == fp32["metrics"]["scored_tokens"] > 0
    assert int8["metrics"]["loss"] == pytest.approx(fp32["metrics"]["loss"], rel=0.05)
    assert [s["answer"] for s in int8["samples"]] == [s["answer"] for s in fp32["samples"]] == [REPLY, REPLY]
    for name in ("rouge_l", "bleu", "chrf", "generation_ok_rate"):
        assert int8["metrics"][name] == fp32["metrics"][name] == pytest.approx(1.0), name
    assert int8["generation"]["stop_token_ids"] == fp32["generation"]["stop_token_ids"]

    # Prompt/response rows: scored as a causal LM, with references.
    rows = tmp_path / "rows"
    rows.mkdir()
    pd.DataFrame({"prompt": [QUESTION, "bob"], "response": [REPLY, "today"]}).to_parquet(rows / "test.parquet")
    plain = evaluate_model(models[1], rows, generation_rows=2, max_new_tokens=8)
    reference = evaluate_model(models[0], rows, generation_rows=2, max_new_tokens=8)
    assert plain["task"] == "causal_lm" and {"perplexity", "rouge_l", "bleu", "chrf"} <= set(plain["metrics"])
    assert plain["metrics"]["scored_tokens"] == reference["metrics"]["scored_tokens"]
    assert [s["answer"] for s in plain["samples"]] == [s["answer"] for s in reference["samples"]]


def test_the_mlflow_pyfunc_model_of_the_int8_artifact_answers_as_the_server(
    models: tuple[Path, Path], served: Any
) -> None:
    """The registered artifact loaded through MLflow's pyfunc wrapper generates (it raised before), with the same
    stop rule as the server."""
    from types import SimpleNamespace

    from airflow_llmops.ml.pyfunc import MODEL_ARTIFACT, TextModel

    model = TextModel()
    model.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(models[1])}))
    assert model.predict(None, [_prompt(served)], {"max_new_tokens": 40}) == [REPLY]
