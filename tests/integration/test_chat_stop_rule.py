"""The server and the evaluation stop a chat model at the same tokens (EOS and the chat template's role markers), so
a served reply is the answer the evaluation scored: a real server process and the evaluation core on one scripted
chat model whose greedy continuation runs into a fabricated next user turn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from scripted_chat_lm import QUESTION, build_scripted_chat_lm
from test_serving_models import Server, start_server

from airflow_llmops.ml.data.chat import ROLE_MARKERS

pytestmark = pytest.mark.integration

REPLY = "Your parcel ships today"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    return build_scripted_chat_lm(tmp_path_factory.mktemp("scripted") / "chat-lm", REPLY)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chat_lm: tuple[Path, list[int]]) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("serve-chat"), "--model", f"chat={chat_lm[0]}", "--torch-threads", "1"
    )
    yield server
    server.process.stop()


def _chat(server: Server, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT)


def test_the_scripted_model_does_ramble_past_the_role_marker(chat_lm: tuple[Path, list[int]]) -> None:
    """The premise: decoded with EOS as the only stop, the model writes the role marker and a new turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_lm[0])
    model = AutoModelForCausalLM.from_pretrained(chat_lm[0])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer(str(prompt), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
        )
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=False)
    assert text.startswith(f"{REPLY}<|user|>\n{REPLY}")


def test_served_reply_equals_the_evaluations_answer_and_stops_at_the_role_marker(
    server: Server, chat_lm: tuple[Path, list[int]], tmp_path: Path
) -> None:
    from airflow_llmops.ml.evaluation import evaluate_model

    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"messages": [json.dumps(conversation)]}).to_parquet(data / "test.parquet")
    evaluated = evaluate_model(chat_lm[0], data, generation_rows=1, max_new_tokens=40)
    assert evaluated["task"] == "chat"
    evaluation_answer = evaluated["samples"][0]["answer"]
    assert evaluation_answer == REPLY

    answer = _chat(server)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["message"]["content"] == evaluation_answer
    assert choice["finish_reason"] == "stop"
    assert answer.json()["usage"]["completion_tokens"] == len(chat_lm[1])  # the marker is not part of the reply

    # The completions endpoint on the rendered prompt stops at the same place.
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(chat_lm[0]).apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": str(prompt), "temperature": 0, "max_tokens": 40},
        timeout=TIMEOUT,
    ).json()["choices"][0]
    assert (completion["text"], completion["finish_reason"]) == (REPLY, "stop")


def test_a_streamed_reply_never_carries_a_role_marker_or_a_second_turn(server: Server) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40, "stream": True},
        timeout=TIMEOUT,
    ) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    text = "".join(deltas)
    assert text == REPLY
    assert not any(marker in delta for marker in ROLE_MARKERS for delta in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_the_mlflow_pyfunc_model_stops_at_the_same_place(chat_lm: tuple[Path, list[int]]) -> None:
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from airflow_llmops.ml.pyfunc import MODEL_ARTIFACT, TextModel

    model = TextModel()
    model.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(chat_lm[0])}))
    prompt = AutoTokenizer.from_pretrained(chat_lm[0]).apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert model.predict(None, [str(prompt)], {"max_new_tokens": 40}) == [REPLY]
