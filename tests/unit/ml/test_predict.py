"""The one predictor layer's rules (airflow_llmops.ml.predict) on real configs, tokenizers and a tiny GPT-2."""

from __future__ import annotations

import math

import pytest
import torch

from airflow_llmops.ml import predict as P
from airflow_llmops.ml.data.chat import ROLE_MARKERS
from airflow_llmops.ml.training import data as D
from airflow_llmops.ml.training import models as M

TEXTS = ["Where is my parcel?", "Your parcel ships today.", "Hello there, how are you?"] * 10


@pytest.mark.parametrize(
    ("config", "causal", "kind"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, True, "causal_lm"),
        ({"architectures": ["LlamaForCausalLM"]}, True, "causal_lm"),
        ({"architectures": ["BertForSequenceClassification"], "model_type": "bert"}, False, "classification"),
        # architectures decide when there are any: a GPT-2 classifier is not a causal LM
        ({"architectures": ["GPT2ForSequenceClassification"], "model_type": "gpt2"}, False, "classification"),
        # no architectures: the model type decides, decoder-only families only
        ({"model_type": "gpt2"}, True, "causal_lm"),
        ({"model_type": "llama"}, True, "causal_lm"),
        ({"model_type": "bert"}, False, None),  # BertLMHeadModel exists, but bert is a masked-LM encoder
        ({"model_type": "t5"}, False, None),
        ({}, False, None),
    ],
)
def test_one_causal_lm_rule_for_configs_and_config_files(config: dict, causal: bool, kind: str | None) -> None:
    from transformers import GPT2Config

    assert P.is_causal_lm(config) is causal
    assert P.model_kind(config) == kind
    if config.get("model_type") == "gpt2":  # a config object answers as its config.json does
        obj = GPT2Config(architectures=config.get("architectures"))
        assert P.is_causal_lm(obj) is causal


def _tokenizer(chat: bool):
    tokenizer = M.train_bpe_tokenizer(TEXTS, 64, ROLE_MARKERS if chat else ())
    if chat:
        D.ensure_chat_template(tokenizer)
    return tokenizer


def test_stop_tokens_are_eos_plus_the_role_markers_of_a_chat_model_only() -> None:
    plain, chat = _tokenizer(chat=False), _tokenizer(chat=True)
    assert P.stop_token_ids(plain) == {plain.eos_token_id}
    markers = {chat.convert_tokens_to_ids(m) for m in ROLE_MARKERS}
    assert P.stop_token_ids(chat) == {chat.eos_token_id, *markers}
    assert chat.pad_token_id not in P.stop_token_ids(chat)
    # a model's generation config may add EOS ids of its own
    config = M.tiny_gpt2_config(vocab_size=len(chat), max_seq_length=64, eos_id=chat.eos_token_id, pad_id=1)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = [chat.eos_token_id, 7]
    assert P.stop_token_ids(chat, model) == {chat.eos_token_id, 7, *markers}


def test_a_special_token_the_chat_template_writes_ends_a_turn() -> None:
    tokenizer = M.train_bpe_tokenizer(TEXTS, 64, ("<|im_start|>", "<|im_end|>", "<|unused|>"))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    ids = P.stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|unused|>") not in ids


def test_perplexity_is_exp_of_the_mean_nll_and_inf_when_that_overflows() -> None:
    assert P.perplexity(0.0) == 1.0
    assert P.perplexity(math.log(42.0)) == pytest.approx(42.0)
    assert P.perplexity(709.0) < math.inf
    assert P.perplexity(710.0) == math.inf


def test_text_nll_weights_every_real_token_and_ignores_padding() -> None:
    from transformers import GPT2LMHeadModel

    tokenizer = _tokenizer(chat=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        M.tiny_gpt2_config(vocab_size=len(tokenizer), max_seq_length=64, eos_id=tokenizer.eos_token_id, pad_id=1)
    ).eval()
    texts = ["Where is my parcel?", "Hello"]
    together = P.text_nll(model, tokenizer, texts, max_length=64, batch_size=2)
    alone = [P.text_nll(model, tokenizer, [t], max_length=64) for t in texts]
    assert together[1] == sum(n for _, n in alone) == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    assert together[0] == pytest.approx(sum(s for s, _ in alone), rel=1e-4)


def test_label_scores_softmax_and_first_label_on_a_tie() -> None:
    results = P.label_scores(torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]]), ["a", "b", "c"], [3, 4])
    assert [r.label for r in results] == ["b", "a"]
    assert sum(results[0].scores.values()) == pytest.approx(1.0)
    assert results[0].score == pytest.approx(math.exp(2) / (1 + math.exp(2) + math.exp(1)))
    assert [r.tokens for r in results] == [3, 4]
    with pytest.raises(ValueError, match="do not fit 2 labels"):
        P.label_scores([[0.0, 1.0, 2.0]], ["a", "b"])


def test_pick_token_is_argmax_when_greedy_and_stays_in_the_nucleus_when_sampling() -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert P.pick_token(logits, 0.0, 1.0) == 1
    generator = torch.Generator().manual_seed(0)
    picks = {P.pick_token(logits, 1.0, 0.9, generator) for _ in range(50)}
    assert picks == {1, 2}
