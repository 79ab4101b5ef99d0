"""``--backend vllm`` against the real vLLM engine: runs where a CUDA GPU and the ``vllm`` package are present (as the
real-cloud tests run where credentials are); skipped elsewhere with the reason.

Two real servers on the same scripted chat model (a GPT-2 whose greedy answer is written in its weights), one with
the built-in continuous batching and one with vLLM: the greedy chat replies, their streams and the stop at the
role marker are the same; 16 concurrent requests through vLLM all get that answer.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from scripted_chat_lm import QUESTION, build_scripted_chat_lm
from test_serving_models import Server, start_server

pytestmark = pytest.mark.system
REPLY = "Your parcel ships today"


def _unavailable() -> str | None:
    from airflow_llmops.serving.vllm_backend import vllm_unavailable

    return vllm_unavailable()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"the vLLM backend cannot run here: {reason}")
    folder, _ = build_scripted_chat_lm(tmp_path_factory.mktemp("scripted") / "chat-lm", REPLY)
    work = tmp_path_factory.mktemp("serve")
    builtin = start_server(work, "--model", f"chat={folder}")
    vllm = start_server(work, "--model", f"chat={folder}", "--backend", "vllm", timeout=600.0)
    yield builtin, vllm
    builtin.process.stop()
    vllm.process.stop()


def _chat(server: Server, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120.0)


def test_vllm_answers_as_the_built_in_backend(servers: tuple[Server, Server]) -> None:
    builtin, vllm = servers
    expected = _chat(builtin).json()["choices"][0]
    got = _chat(vllm).json()["choices"][0]
    assert got["message"]["content"] == expected["message"]["content"] == REPLY
    assert got["finish_reason"] == expected["finish_reason"] == "stop"
    with httpx.stream(
        "POST",
        f"{vllm.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40, "stream": True},
        timeout=120.0,
    ) as stream:
        assert "<|user|>" not in "".join(stream.iter_text())
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: _chat(vllm).json()["choices"][0]["message"]["content"], range(16)))
    assert replies == [REPLY] * 16
