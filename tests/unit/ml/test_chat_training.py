"""Supervised chat fine-tuning's data side: conversations rendered with a chat template and labelled on the
assistant's turns only, with real tokenizers (the tiny byte-level BPE trained on the conversations, and MiniLM's
WordPiece, whose tokenizer knows nothing of the role markers)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from airflow_llmops.ml.data.chat import CHAT_TEMPLATE, ROLE_MARKERS, render_chat
from airflow_llmops.ml.training import data as D
from airflow_llmops.ml.training.models import EOS, tiny_gpt2_tokenizer, train_bpe_tokenizer
from airflow_llmops.specs import SpecValidationError, TrainingSpec

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer questions about parcels."},
        {"role": "user", "content": "Where is parcel 42?"},
        {"role": "assistant", "content": "It left the depot yesterday.\nIt arrives tomorrow."},
        {"role": "user", "content": "Thanks, and parcel 7?"},
        {"role": "assistant", "content": "Parcel 7 was delivered on Monday."},
    ],
    [
        {"role": "user", "content": "Do you like pizza?"},
        {"role": "assistant", "content": "I do not eat, but pizza sounds delicious."},
    ],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "```\n3 + 3 = 6\n```"},
    ],
]


def frame_of(conversations: list[list[dict[str, str]]]) -> pd.DataFrame:
    """A chat split as the prepare stage writes it: one JSON conversation per row."""
    return pd.DataFrame({"messages": [json.dumps(c) for c in conversations]})


@pytest.fixture(scope="module")
def tiny_tokenizer():
    corpus = D.chat_corpus(frame_of(CONVERSATIONS * 5))
    tokenizer = train_bpe_tokenizer(corpus, 128, ROLE_MARKERS)
    assert D.ensure_chat_template(tokenizer)
    return tokenizer


def trained_text(tokenizer, example: dict[str, list[int]]) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != D.IGNORE])


def assistant_turns_with_end(tokenizer, messages: list[dict[str, str]]) -> str:
    """What the loss must cover: each assistant content, its line break and the end-of-turn (EOS) token."""
    return "".join(f"{m['content']}\n{tokenizer.eos_token}" for m in messages if m["role"] == "assistant")


def test_the_tiny_tokenizer_keeps_each_role_marker_as_one_special_token(tiny_tokenizer):
    for marker in ROLE_MARKERS:
        ids = tiny_tokenizer(f"x{marker}y", add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.convert_tokens_to_ids(marker) in ids
        assert tiny_tokenizer.convert_ids_to_tokens(ids).count(marker) == 1
    assert set(ROLE_MARKERS) <= set(tiny_tokenizer.all_special_tokens)
    # The corpus is the conversations' text: their words are in the vocabulary as whole tokens.
    assert "Ġparcel" in tiny_tokenizer.get_vocab()


def test_the_default_template_is_render_chat_plus_eos_after_each_assistant_turn(tiny_tokenizer):
    for messages in CONVERSATIONS:
        text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
        assert text.replace(EOS, "") == render_chat(messages)
        assert text.count(EOS) == sum(m["role"] == "assistant" for m in messages)
        prompt = tiny_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt.replace(EOS, "") == render_chat(messages[:-1]) + "<|assistant|>\n"


def test_the_template_round_trips_through_save_and_load(tiny_tokenizer, tmp_path: Path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    messages = CONVERSATIONS[0]
    assert loaded.apply_chat_template(messages, tokenize=False) == tiny_tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert [loaded.convert_tokens_to_ids(m) for m in ROLE_MARKERS] == [
        tiny_tokenizer.convert_tokens_to_ids(m) for m in ROLE_MARKERS
    ]
    assert D.chat_example(loaded, messages) == D.chat_example(tiny_tokenizer, messages)


def test_a_template_the_tokenizer_already_has_is_kept(tiny_tokenizer):
    class WithTemplate:
        chat_template = "{{ messages }}"

    assert not D.ensure_chat_template(WithTemplate())
    assert WithTemplate.chat_template == "{{ messages }}"


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_labels_cover_exactly_the_assistant_turns_and_their_end(tiny_tokenizer, index: int):
    messages = CONVERSATIONS[index]
    example = D.chat_example(tiny_tokenizer, messages)
    assert example is not None
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert len(labels) == len(ids)
    assert all(label in (D.IGNORE, token) for token, label in zip(ids, labels, strict=True))
    assert trained_text(tiny_tokenizer, example) == assistant_turns_with_end(tiny_tokenizer, messages)
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids)
    marker_ids = {tiny_tokenizer.convert_tokens_to_ids(m) for m in ROLE_MARKERS}
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if token in marker_ids:
            assert label == D.IGNORE, f"role marker {tokens[position]} is trained"
            assert tokens[position + 1] == "Ċ" and labels[position + 1] == D.IGNORE  # the line break after it
    # The masked tokens are exactly the system and user turns and the assistant's role markers.
    masked = tiny_tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == D.IGNORE])
    expected = "".join(
        f"<|{m['role']}|>\n" + ("" if m["role"] == "assistant" else f"{m['content']}\n") for m in messages
    )
    assert masked == expected
    # The end-of-turn token after every assistant content is trained.
    eos_positions = [p for p, t in enumerate(ids) if t == tiny_tokenizer.eos_token_id]
    assert eos_positions and all(labels[p] == tiny_tokenizer.eos_token_id for p in eos_positions)


def test_slow_path_by_segments_agrees_with_offsets(tiny_tokenizer):
    for messages in CONVERSATIONS:
        text, spans = D.assistant_spans(tiny_tokenizer, messages)
        assert D._segment_tokens(tiny_tokenizer, text, spans) == D.chat_example(tiny_tokenizer, messages)


def test_a_real_pretrained_tokenizer_without_special_markers():
    """MiniLM's WordPiece splits the markers into several tokens and has no EOS; the loss still covers the
    assistant's words only (lower-cased by this tokenizer)."""
    from airflow_llmops.ml.models import load_tokenizer

    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    assert tokenizer.chat_template is None and tokenizer.eos_token is None
    assert D.ensure_chat_template(tokenizer)
    for messages in CONVERSATIONS:
        example = D.chat_example(tokenizer, messages)
        assert example is not None
        trained = [t for t in example["labels"] if t != D.IGNORE]
        expected = [
            t
            for m in messages
            if m["role"] == "assistant"
            for t in tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        ]
        assert trained == expected


def test_a_model_template_with_its_own_end_of_turn(tiny_tokenizer):
    """A ChatML-style template (the model's own): the span runs from after the generation prompt through the
    template's end-of-turn text."""
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = train_bpe_tokenizer(D.chat_corpus(frame_of(CONVERSATIONS)), 128)
    tokenizer.chat_template = chatml
    messages = CONVERSATIONS[0]
    text, spans = D.assistant_spans(tokenizer, messages)
    assert [text[lo:hi] for lo, hi in spans] == [
        f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant"
    ]
    example = D.chat_example(tokenizer, messages)
    assert example is not None
    assert trained_text(tokenizer, example) == "".join(
        f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant"
    )


def test_long_conversations_are_truncated_and_ones_without_assistant_tokens_dropped(tiny_tokenizer):
    frame = frame_of(CONVERSATIONS)
    full, stats = D.tokenize_chat(tiny_tokenizer, frame, 512)
    assert len(full) == 3 and stats.truncated == 0 and stats.no_assistant_left == 0
    lengths = sorted(len(e["input_ids"]) for e in full.examples)
    # Just past the first assistant marker of the longest conversation: its reply is cut, others are kept.
    first = full.examples[0]
    first_trained = next(i for i, label in enumerate(first["labels"]) if label != D.IGNORE)
    limit = first_trained + 2
    cut, stats = D.tokenize_chat(tiny_tokenizer, frame, limit)
    assert all(len(e["input_ids"]) <= limit for e in cut.examples)
    assert cut.examples[0] == {k: v[:limit] for k, v in first.items()}
    assert stats.truncated + stats.no_assistant_left == sum(n > limit for n in lengths)
    # Shorter than any conversation's prompt: every conversation loses all its assistant tokens.
    none_left, stats = D.tokenize_chat(tiny_tokenizer, frame, 4)
    assert len(none_left) == 0 and stats.no_assistant_left == 3
    assert "3 train conversations were dropped" in " ".join(stats.notes("train", 4))


def test_a_conversation_that_is_only_prompt_within_the_limit_is_dropped_and_counted(tiny_tokenizer):
    long_question = [
        {"role": "user", "content": " ".join(["where is my parcel"] * 40)},
        {"role": "assistant", "content": "On its way."},
    ]
    dataset, stats = D.tokenize_chat(tiny_tokenizer, frame_of([long_question, CONVERSATIONS[1]]), 48)
    assert len(dataset) == 1 and stats.no_assistant_left == 1 and stats.conversations == 2
    assert trained_text(tiny_tokenizer, dataset[0]) == assistant_turns_with_end(tiny_tokenizer, CONVERSATIONS[1])


def test_malformed_conversations_are_dropped_with_a_reason(tiny_tokenizer):
    bad = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]
    dataset, stats = D.tokenize_chat(tiny_tokenizer, frame_of([bad, CONVERSATIONS[1]]), 128)
    assert len(dataset) == 1 and stats.malformed == 1
    assert "unknown_role:message 1" in " ".join(stats.notes("train", 128))


def test_the_collator_pads_chat_labels_with_ignore(tiny_tokenizer):
    dataset, _ = D.tokenize_chat(tiny_tokenizer, frame_of(CONVERSATIONS[:2]), 128)
    batch = D.PadCollator(tiny_tokenizer.pad_token_id, causal_lm=True)(dataset.examples)
    short = min(range(2), key=lambda i: len(dataset[i]["input_ids"]))
    n = len(dataset[short]["input_ids"])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert torch.equal(batch["labels"][short, :n], torch.tensor(dataset[short]["labels"]))
    assert (batch["labels"][short, n:] == D.IGNORE).all() and (batch["attention_mask"][short, n:] == 0).all()


def test_the_cached_tokenizer_is_per_set_of_special_tokens(tmp_path: Path):
    corpus = D.chat_corpus(frame_of(CONVERSATIONS))
    chat = tiny_gpt2_tokenizer(corpus, 64, tmp_path, None, extra_special_tokens=ROLE_MARKERS)
    plain = tiny_gpt2_tokenizer(corpus, 64, tmp_path, None)
    assert "<|user|>" in chat.get_vocab() and "<|user|>" not in plain.get_vocab()
    again = tiny_gpt2_tokenizer(corpus, 64, tmp_path, None, extra_special_tokens=ROLE_MARKERS)
    assert again.get_vocab() == chat.get_vocab() and "<|user|>" in again.all_special_tokens


def test_chat_is_a_training_task_with_the_tiny_gpt2_default():
    spec = TrainingSpec(task="chat")
    assert spec.resolved_model == "tiny-gpt2" and spec.lora is None
    assert TrainingSpec.parse({"task": "chat", "lora": {"r": 4}}).lora.merge is True
    with pytest.raises(SpecValidationError, match=r"lora\.merge=False saves only the adapters"):
        TrainingSpec.parse({"task": "chat", "lora": {"merge": False}})
    assert TrainingSpec.parse({"task": "chat", "model": "/models/base", "lora": {"merge": False}}).lora.merge is False
