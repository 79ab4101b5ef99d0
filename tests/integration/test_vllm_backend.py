"""``--backend vllm``: the adapter between the model server and vLLM's ``AsyncLLMEngine``.

vLLM needs a CUDA GPU, so here the SDK boundary is a stand-in module (``FakeVllm``) with vLLM's engine API
(``AsyncEngineArgs``, ``AsyncLLMEngine.from_engine_args``, the async ``generate`` iterator of cumulative
``RequestOutput`` objects, ``abort``, ``SamplingParams``) whose engine really decodes, greedily, with the model
folder through transformers, honouring ``max_tokens``, ``stop_token_ids`` and stop strings as vLLM does. What is
tested is ours: the prompt's token ids, the stop ids (EOS and the chat role markers, the rule of the built-in
loop and of the evaluation), streaming deltas, abort on a client that goes away, finish reasons, and the
server's routes on top. ``tests/system/test_vllm_gpu.py`` runs the real vLLM where a GPU
and the package are present. On this machine the server refuses ``--backend vllm`` with the reason.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from scripted_chat_lm import QUESTION, build_scripted_chat_lm

pytestmark = pytest.mark.integration

REPLY = "Your parcel ships today"


class FakeVllm:
    """vLLM's engine API over a transformers model (greedy only: the tests decode with temperature 0)."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.requests: list[tuple[list[int], Any]] = []
        self.engine_args: dict[str, Any] = {}
        fake = self

        class AsyncEngineArgs:
            def __init__(self, **kwargs: Any) -> None:
                fake.engine_args = kwargs
                self.model = kwargs["model"]

        class SamplingParams(SimpleNamespace):
            pass

        class AsyncLLMEngine:
            def __init__(self, model_dir: str) -> None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

            @classmethod
            def from_engine_args(cls, args: Any) -> AsyncLLMEngine:
                asyncio.get_running_loop()  # vLLM builds its engine on a running loop
                return cls(args.model)

            async def abort(self, request_id: str) -> None:
                fake.aborted.append(request_id)

            async def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> Any:
                import torch

                ids = list(prompt["prompt_token_ids"])
                fake.requests.append((ids, params))
                out: list[int] = []
                while True:
                    with torch.inference_mode():
                        logits = self.model(torch.tensor([ids + out])).logits[0, -1]
                    token = int(logits.argmax())
                    finish = None
                    if token in params.stop_token_ids:
                        finish = "stop"
                    else:
                        out.append(token)
                    text = self.tokenizer.decode(out, skip_special_tokens=params.skip_special_tokens)
                    for stop in params.stop:
                        if stop in text:
                            text, finish = text[: text.index(stop)], "stop"
                    if finish is None and len(out) >= params.max_tokens:
                        finish = "length"
                    completion = SimpleNamespace(text=text, token_ids=list(out), finish_reason=finish)
                    yield SimpleNamespace(request_id=request_id, outputs=[completion], finished=finish is not None)
                    if finish is not None:
                        return
                    await asyncio.sleep(0)

        self.AsyncEngineArgs = AsyncEngineArgs
        self.SamplingParams = SamplingParams
        self.AsyncLLMEngine = AsyncLLMEngine


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_chat_lm(tmp_path_factory.mktemp("scripted") / "chat-lm", REPLY)[0]


def _folder(path: Path) -> Any:
    from airflow_llmops.serving.sources import ModelFolder

    return ModelFolder(str(path), path, path)


@pytest.fixture()
def served(chat_lm: Path) -> Iterator[tuple[Any, FakeVllm]]:
    from airflow_llmops.serving.vllm_backend import VllmCausalLM

    fake = FakeVllm()
    model = VllmCausalLM(_folder(chat_lm), vllm=fake)
    yield model, fake
    model.close(drain_s=1.0)


def _params(**kwargs: Any) -> Any:
    from airflow_llmops.serving.models import GenerationParams

    return GenerationParams(**{"temperature": 0.0, "max_tokens": 40, **kwargs})


def test_a_chat_reply_through_vllm_is_the_built_in_backends_and_stops_at_the_role_marker(
    served: tuple[Any, FakeVllm], chat_lm: Path
) -> None:
    from airflow_llmops.ml.data.chat import ROLE_MARKERS
    from airflow_llmops.serving.models import HFCausalLM

    model, fake = served
    prompt = model.chat_prompt([("user", QUESTION)])
    pieces: list[str] = []
    answer = model.generate(prompt, _params(), on_text=pieces.append, cancelled=threading.Event())
    assert answer.text == REPLY and answer.finish_reason == "stop", answer
    assert "".join(pieces) == answer.text and len(pieces) > 1  # streamed as it decoded, deltas only

    builtin = HFCausalLM(_folder(chat_lm))
    try:
        expected = builtin.generate(
            builtin.chat_prompt([("user", QUESTION)]), _params(), on_text=None, cancelled=threading.Event()
        )
    finally:
        builtin.close(1.0)
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens) == (
        expected.text,
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    ids, sampling = fake.requests[-1]
    assert ids == [int(i) for i in model.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    markers = {model.tokenizer.convert_tokens_to_ids(m) for m in ROLE_MARKERS}
    assert markers <= set(sampling.stop_token_ids) and model.tokenizer.eos_token_id in sampling.stop_token_ids
    assert sampling.temperature == 0.0 and sampling.include_stop_str_in_output is False
    assert fake.engine_args["max_model_len"] == model.context


def test_max_tokens_stop_strings_and_a_client_that_goes_away(served: tuple[Any, FakeVllm]) -> None:
    model, fake = served
    prompt = model.chat_prompt([("user", QUESTION)])
    short = model.generate(prompt, _params(max_tokens=2), on_text=None, cancelled=threading.Event())
    assert short.finish_reason == "length" and short.completion_tokens == 2
    assert fake.requests[-1][1].max_tokens == 2

    cut = model.generate(prompt, _params(stop=("ships",)), on_text=None, cancelled=threading.Event())
    assert cut.text == REPLY[: REPLY.index("ships")] and cut.finish_reason == "stop"

    cancelled = threading.Event()
    seen: list[str] = []

    def on_text(piece: str) -> None:  # the client disconnects after the first piece
        seen.append(piece)
        cancelled.set()

    gone = model.generate(prompt, _params(), on_text=on_text, cancelled=cancelled)
    assert len(seen) == 1 and gone.text == seen[0] and len(fake.aborted) == 1
    assert model.busy == 0


def test_the_server_answers_and_streams_through_the_vllm_adapter(chat_lm: Path, tmp_path: Path) -> None:
    """The server's routes on top of the adapter: a chat completion and its stream."""
    from fastapi.testclient import TestClient

    from airflow_llmops.serving import models
    from airflow_llmops.serving.app import create_app
    from airflow_llmops.serving.config import ServerConfig, VariantSpec
    from airflow_llmops.serving.vllm_backend import VllmCausalLM, _is_plain_causal_lm

    fake = FakeVllm()
    models.register_loader(models.Loader("vllm-causal-lm", _is_plain_causal_lm, lambda f: VllmCausalLM(f, vllm=fake)))
    try:
        config = ServerConfig(
            variants=[VariantSpec(name="v1", source=str(chat_lm))],
            model_cache=tmp_path / "cache",
            wait_for_models_s=60.0,
        )
        with TestClient(create_app(config)) as client:
            assert client.get("/readyz").status_code == 200
            body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == REPLY
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
                streamed = "".join(stream.iter_text())
            assert '"content"' in streamed and "<|user|>" not in streamed
            assert len(fake.requests) == 2
    finally:
        models._LOADERS[:] = [x for x in models._LOADERS if x.name != "vllm-causal-lm"]


def test_a_machine_without_cuda_or_vllm_is_refused_with_the_reason(tmp_path: Path) -> None:
    import torch

    from airflow_llmops.serving.errors import ModelLoadError
    from airflow_llmops.serving.vllm_backend import install, vllm_unavailable

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/system/test_vllm_gpu.py covers it")
    reason = vllm_unavailable()
    assert reason is not None and "CUDA" in reason
    with pytest.raises(ModelLoadError, match=r"--backend vllm: .*CUDA.*use --backend hf"):
        install()
    argv = [sys.executable, "-m", "airflow_llmops.cli", "serve", "--backend", "vllm", "--model", "m=echo://"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--backend vllm" in done.stderr and "CUDA" in done.stderr, done.stderr
