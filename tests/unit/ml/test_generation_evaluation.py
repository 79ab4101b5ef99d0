"""The evaluation core on small real models (GPT-2 built from a config, a BPE tokenizer trained on the rows): which
kind of model, perplexity labelled as training labels it, prompts and references for chat and prompt/response rows,
and a quantized chat model through the same path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from airflow_llmops.ml.data.chat import ROLE_MARKERS
from airflow_llmops.ml.evaluation import EvaluationInputError, evaluate_model, model_task
from airflow_llmops.ml.training import data as D
from airflow_llmops.ml.training import models as M

CHATS = [
    [
        {"role": "system", "content": "You answer questions about parcels."},
        {"role": "user", "content": f"Where is parcel {n}?"},
        {"role": "assistant", "content": f"Parcel {n} left the depot and arrives tomorrow."},
    ]
    for n in range(12)
] + [
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Track my parcel."},
        {"role": "assistant", "content": "Which parcel number?"},
    ]
]


def _save(folder: Path, frame: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        frame.to_parquet(folder / f"{split}.parquet")
    return folder


def _model(folder: Path, texts: list[str], *, chat: bool) -> Path:
    tokenizer = M.train_bpe_tokenizer(texts, 64, ROLE_MARKERS if chat else ())
    if chat:
        D.ensure_chat_template(tokenizer)
    torch.manual_seed(0)
    config = M.tiny_gpt2_config(
        vocab_size=len(tokenizer), max_seq_length=64, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
    )
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chat")
    frame = pd.DataFrame({"messages": [json.dumps(c) for c in CHATS]})
    data = _save(root / "data", frame)
    return _model(root / "model", D.chat_corpus(frame), chat=True), data


def test_model_task_tells_chat_from_causal_lm_by_the_data(chat: tuple[Path, Path]) -> None:
    model, _ = chat
    assert model_task(model) == "causal_lm"
    assert model_task(model, ["prompt", "response"]) == "causal_lm"
    assert model_task(model, ["record_id", "messages", "n_tokens"]) == "chat"


def test_chat_perplexity_on_assistant_tokens_and_prompts_from_the_template(chat: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = chat
    result = evaluate_model(model_dir, data, generation_rows=5, max_new_tokens=6, batch_size=4)
    assert result["task"] == "chat"
    metrics = result["metrics"]
    assert metrics["rows"] == len(CHATS) and metrics["generated"] == 5
    assert {"rouge_l", "bleu", "chrf"} <= set(metrics) and all(0 <= metrics[k] <= 1 for k in ("rouge_l", "chrf"))

    # The same number as the model's own loss on the training labels (assistant tokens only), token-weighted.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = count = 0.0
    with torch.inference_mode():
        for conversation in CHATS:
            example = D.chat_example(tokenizer, conversation)
            assert example is not None
            labels = torch.tensor([example["labels"]])
            n = int((labels[:, 1:] != D.IGNORE).sum())
            total += float(model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss) * n
            count += n
    assert metrics["scored_tokens"] == count
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

    first = result["samples"][0]
    assert first["prompt"] == tokenizer.apply_chat_template(CHATS[0][:-1], tokenize=False, add_generation_prompt=True)
    assert first["prompt"].endswith("<|assistant|>\n") and first["reference"] == CHATS[0][-1]["content"]
    # A multi-turn conversation is prompted with everything before its last assistant turn.
    result = evaluate_model(model_dir, data, generation_rows=len(CHATS), max_new_tokens=4)
    last = result["samples"][-1]
    assert "Hi! How can I help?" in last["prompt"] and last["reference"] == "Which parcel number?"


def test_prompt_response_rows_are_prompted_as_training_joins_them(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "prompt": [f"how far is town {n}?" for n in range(10)],
            "response": [f"town {n} is {n} miles away." for n in range(10)],
        }
    )
    data = _save(tmp_path / "data", frame)
    model_dir = _model(tmp_path / "model", D.tokenizer_corpus(frame), chat=False)
    result = evaluate_model(model_dir, data, generation_rows=3, max_new_tokens=5)
    assert result["task"] == "causal_lm"
    assert [s["prompt"] for s in result["samples"]] == [f"how far is town {n}?{M.EOS}" for n in range(3)]
    assert [s["reference"] for s in result["samples"]] == list(frame["response"][:3])
    assert {"perplexity", "rouge_l", "bleu", "chrf", "generation_ok_rate"} <= set(result["metrics"])

    # Plain text rows: answers, but no reference to score them against.
    text = _save(tmp_path / "text", pd.DataFrame({"text": list(frame["prompt"])}))
    result = evaluate_model(model_dir, text, generation_rows=2, max_new_tokens=3)
    assert "rouge_l" not in result["metrics"] and len(result["samples"]) == 2

    wrong = _save(tmp_path / "wrong", pd.DataFrame({"question": ["a"]}))
    with pytest.raises(EvaluationInputError, match="prompt/response or text"):
        evaluate_model(model_dir, wrong)


def test_a_quantized_chat_model_answers_through_the_same_path(chat: tuple[Path, Path], tmp_path: Path) -> None:
    from airflow_llmops.ml.quantization import quantize_model

    model_dir, data = chat
    quantize_model(model_dir, "torch_dynamic_int8", tmp_path / "int8")
    result = evaluate_model(tmp_path / "int8", data, generation_rows=2, max_new_tokens=4)
    assert result["task"] == "chat" and result["metrics"]["generated"] == 2
    assert {"perplexity", "rouge_l"} <= set(result["metrics"]) and result["metrics"]["perplexity"] > 1
