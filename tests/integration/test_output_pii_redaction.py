"""``redact_output_pii``: a real server whose chat model answers with an e-mail address, redacted in completions, chat
completions and their streams (the address arrives over five tokens, so the stream must hold it back), counted in
``/metrics``, and never written to the request log; a variant that turns the option off answers unredacted."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from scripted_chat_lm import QUESTION, build_scripted_chat_lm
from test_serving_models import Server, start_server

from airflow_llmops.serving.client import ServingClient
from airflow_llmops.serving.request_log import read_request_log

pytestmark = pytest.mark.integration

REPLY = "Write to bob@example.com today"
REDACTED = "Write to [EMAIL] today"
ADMIN = "admin-secret"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, ids = build_scripted_chat_lm(tmp_path_factory.mktemp("scripted") / "mail-lm", REPLY)
    assert len(ids) >= 5  # the address spans several tokens, hence several stream chunks
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve-pii")
    server = start_server(
        work,
        "--model",
        f"private={model_dir}",
        "--redact-output-pii",
        "--admin-token",
        ADMIN,
        "--request-log",
        str(work / "requests"),
        "--torch-threads",
        "1",
    )
    ServingClient(server.url, ADMIN).add_variant("open", str(model_dir), weight=0, redact_output_pii=False)
    yield server
    server.process.stop()


def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _stream(server: Server, path: str, body: dict[str, Any]) -> list[str]:
    """The text pieces of a streamed answer, one per SSE chunk."""
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = []
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            piece = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
            if piece:
                pieces.append(piece)
    return pieces


def _chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40}


def _prompt(model_dir: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": QUESTION}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _redactions(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for labels, value in re.findall(r"^llmops_output_pii_redactions_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        if set(re.findall(r'(\w+)="([^"]*)"', labels)) == {("type", "email"), ("variant", "private")}:
            return float(value)
    return 0.0


def test_the_unredacted_variant_shows_what_the_model_says(server: Server) -> None:
    answer = _post(server, "/v1/chat/completions", _chat_body("open"))
    assert answer["choices"][0]["message"]["content"] == REPLY
    assert "".join(_stream(server, "/v1/chat/completions", _chat_body("open"))) == REPLY


def test_chat_completions_are_redacted_streamed_or_not(server: Server) -> None:
    before = _redactions(server)
    answer = _post(server, "/v1/chat/completions", _chat_body("private"))
    assert answer["choices"][0]["message"]["content"] == REDACTED
    pieces = _stream(server, "/v1/chat/completions", _chat_body("private"))
    assert "".join(pieces) == REDACTED
    assert len(pieces) >= 2 and not any("@" in p or "bob" in p or "example" in p for p in pieces)
    assert _redactions(server) == before + 2


def test_completions_are_redacted_streamed_or_not(server: Server, model_dir: Path) -> None:
    body = {"model": "private", "prompt": _prompt(model_dir), "temperature": 0, "max_tokens": 40}
    before = _redactions(server)
    assert _post(server, "/v1/completions", body)["choices"][0]["text"] == REDACTED
    pieces = _stream(server, "/v1/completions", body)
    assert "".join(pieces) == REDACTED and not any("bob" in p for p in pieces)
    assert _redactions(server) == before + 2


def test_the_request_log_and_server_log_never_hold_the_address(server: Server) -> None:
    _post(server, "/v1/chat/completions", _chat_body("private"))
    server.process.stop()  # flushes the request log
    records = [r for r in read_request_log(server.workdir / "requests") if r["variant"] == "private"]
    assert REDACTED in [r["output"] for r in records]
    assert not any("bob@example.com" in json.dumps(r) for r in records)
    assert "bob@example.com" not in server.log_text
