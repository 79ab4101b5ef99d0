"""The one predictor layer: what kind of model a folder holds, classification, perplexity and generation.

The model server (:mod:`airflow_llmops.serving.models` and its decode loop), the evaluation
(:mod:`airflow_llmops.ml.evaluation`), the quantization stage's predictors
(:mod:`airflow_llmops.ml.quantization.predictors`) and the MLflow pyfunc model (:mod:`airflow_llmops.ml.pyfunc`) all
load and run models through these functions, so a model answers the same everywhere. The rules, stated once:

- **Causal LM** (:func:`is_causal_lm`): the config's ``architectures`` decide when it names any: a causal LM is one
  whose architecture ends in ``ForCausalLM`` or ``LMHeadModel`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``...).
  Only a config without ``architectures`` falls back to its ``model_type``: a causal LM when transformers maps that
  type to a causal-LM class and to neither a masked-LM nor a sequence-to-sequence one (a decoder-only family, so a
  bare ``bert`` config stays an encoder). A *classifier* is a ``*ForSequenceClassification`` architecture.
- **Chat model** (:func:`is_chat_model`): a causal LM whose tokenizer has a chat template. Whether *data* is scored
  as chat (conversations) is the evaluation's decision; how a model *stops* depends on the model only.
- **Stop tokens** (:func:`stop_token_ids`): every EOS id (the tokenizer's, the generation config's, the model
  config's); for a chat model also every special token that marks a turn: the role markers the data layer writes
  (``<|user|>``, ``<|assistant|>``, ``<|system|>``) and any other special token written literally by the chat
  template (``<|im_end|>``, ``<|eot_id|>``, ``<|start_header_id|>``...). A reply that reaches one of them has ended;
  what a model writes after it is a turn it invented. Role markers that are not single special tokens cannot be
  stopped at token level.
- **Classification**: texts tokenized with padding and truncation at :func:`input_limit` (the asked length, the
  model's position table and the tokenizer's limit, whichever is smallest), run in batches of similar lengths,
  softmax over the logits, the label of the highest probability from ``id2label`` (the first on a tie).
- **Perplexity** (:func:`perplexity`): ``exp`` of the token-weighted mean next-token negative log-likelihood over
  the labelled tokens (every real token, or the labels a caller gives: the assistant's tokens for chat). When
  ``exp`` overflows (a mean NLL above ~709.78 nats) the perplexity is ``inf``; no cap, no ``None``.
- **Generation**: greedy below temperature :data:`GREEDY_BELOW`, else sampling with temperature and nucleus
  (top-p) filtering (:func:`pick_token`); generation ends at a stop token (never part of the text) or at the
  token budget; text is decoded without special tokens.

numpy, torch and transformers are imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CLASSIFIER_SUFFIX = "ForSequenceClassification"
#: Temperatures below this decode greedily (argmax), as OpenAI's ``temperature=0`` does.
GREEDY_BELOW = 1e-5
#: Label of a token that does not count (padding, prompt tokens of a chat), as in training.
IGNORE_INDEX = -100

ModelKind = Literal["classification", "causal_lm"]


# ---- what a folder holds ---------------------------------------------------------------------------------------


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def architectures(config: Any) -> list[str]:
    """The ``architectures`` of a config object or of a parsed ``config.json``."""
    names = _field(config, "architectures")
    return [str(n) for n in names] if isinstance(names, list | tuple) else []


def _decoder_only_types() -> frozenset[str]:
    from transformers.models.auto import modeling_auto as auto

    causal = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    other = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    return frozenset(causal - other)


def is_causal_lm(config: Any) -> bool:
    """The causal-LM rule of the module docstring, for a config object or a parsed ``config.json``."""
    names = architectures(config)
    if names:
        return any(n.endswith(CAUSAL_LM_SUFFIXES) for n in names)
    kind = _field(config, "model_type")
    return isinstance(kind, str) and kind in _decoder_only_types()


def is_classifier(config: Any) -> bool:
    return any(n.endswith(CLASSIFIER_SUFFIX) for n in architectures(config))


def model_kind(config: Any) -> ModelKind | None:
    """``causal_lm``, ``classification``, or None for anything else (an encoder without a head, a seq2seq
    model)."""
    if is_causal_lm(config):
        return "causal_lm"
    return "classification" if is_classifier(config) else None


def is_chat_model(tokenizer: Any) -> bool:
    """A tokenizer with a chat template (the model is then served and scored as a chat model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def positions(config: Any) -> int | None:
    """The model's position table (prompt plus answer must fit in it), or None for models without one."""
    for name in ("n_positions", "max_position_embeddings"):
        value = _field(config, name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def input_limit(config: Any, tokenizer: Any, max_length: int) -> int:
    """Tokens a classifier reads: ``max_length``, the position table and the tokenizer's own limit, the smallest."""
    limits = [max_length]
    table = positions(config)
    if table is not None:
        limits.append(table)
    own = getattr(tokenizer, "model_max_length", None)
    if isinstance(own, int) and 0 < own < 1_000_000:  # unset limits are ~1e30
        limits.append(own)
    return max(1, min(limits))


def _ids(value: Any) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list | tuple):
        return {int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _special_tokens(tokenizer: Any) -> set[str]:
    tokens = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(getattr(added, "content", added)))
    return tokens


def stop_token_ids(tokenizer: Any, model: Any = None) -> frozenset[int]:
    """The token ids that end a generation (the stop rule of the module docstring)."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        ids |= _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        ids |= _ids(getattr(getattr(model, "config", None), "eos_token_id", None))
    if is_chat_model(tokenizer):
        from airflow_llmops.ml.data.chat import ROLE_MARKERS

        template = tokenizer.chat_template
        text = template if isinstance(template, str) else " ".join(str(t) for t in _flatten(template))
        pad = getattr(tokenizer, "pad_token", None)
        for token in _special_tokens(tokenizer):
            if token in ROLE_MARKERS or (token != pad and token in text):
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id >= 0 and token_id != getattr(tokenizer, "unk_token_id", -1):
                    ids.add(token_id)
    return frozenset(ids)


def _flatten(template: Any) -> Iterable[Any]:
    """Named chat templates (a dict or list of {"name", "template"}) as their texts."""
    if isinstance(template, Mapping):
        return [str(v) for v in template.values()]
    if isinstance(template, list | tuple):
        return [str(t.get("template", "")) if isinstance(t, Mapping) else str(t) for t in template]
    return [template]


# ---- classification -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelScores:
    """One text's prediction: the label, its probability, every label's probability and the tokens read."""

    label: str
    score: float
    scores: dict[str, float]
    tokens: int


def class_labels(config: Any) -> list[str]:
    """Label names in logit order, from ``id2label``."""
    raw = _field(config, "id2label") or {}
    id2label = {int(k): str(v) for k, v in dict(raw).items()}
    return [id2label[i] for i in sorted(id2label)]


def softmax(logits: Any) -> Any:
    """Row-wise softmax in float64 (stable: the row maximum is subtracted first); a numpy array."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    exp = np.exp(values - values.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def label_scores(logits: Any, labels: Sequence[str], tokens: Sequence[int] | None = None) -> list[LabelScores]:
    """Predictions from ``(texts, labels)`` logits (torch or numpy)."""
    import numpy as np

    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    probs = softmax(logits)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"logits of shape {probs.shape} do not fit {len(labels)} labels")
    counts = list(tokens) if tokens is not None else [0] * len(probs)
    out = []
    for row, n_tokens in zip(probs.tolist(), counts, strict=True):
        best = int(np.argmax(row))
        scores = {label: float(p) for label, p in zip(labels, row, strict=True)}
        out.append(LabelScores(labels[best], float(row[best]), scores, int(n_tokens)))
    return out


def classify(
    model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 8
) -> list[LabelScores]:
    """A sequence classifier on ``texts``, in the texts' order.

    Texts run sorted by length in batches of ``batch_size`` (less padding; on 2 CPU cores 32 texts as 4 sorted
    batches of 8 ran ~20% faster than one batch of 32), truncated at :func:`input_limit`."""
    import torch

    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    labels = class_labels(model.config)
    limit = input_limit(model.config, tokenizer, max_length)
    device = next(model.parameters(), torch.empty(0)).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[LabelScores | None] = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start : start + max(1, batch_size)]
            enc = tokenizer(
                [str(texts[i]) for i in chunk], padding=True, truncation=True, max_length=limit, return_tensors="pt"
            ).to(device)
            logits = model(**enc).logits
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            for i, result in zip(chunk, label_scores(logits, labels, lengths), strict=True):
                out[i] = result
    return [r for r in out if r is not None]


# ---- perplexity ------------------------------------------------------------------------------------------------


def nll_sum(model: Any, input_ids: Any, attention_mask: Any, labels: Any = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch and the number of tokens it covers.

    ``labels`` (``IGNORE_INDEX`` where a token does not count) default to the input ids with padding ignored."""
    import torch

    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return float(loss), int((targets != IGNORE_INDEX).sum())


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``; ``inf`` where that overflows a float."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def text_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 16
) -> tuple[float, int]:
    """Summed NLL and scored tokens of plain texts (every real token after the first), truncated at
    ``max_length``."""
    import torch

    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        nll, n = nll_sum(model, batch["input_ids"], batch["attention_mask"])
        total, count = total + nll, count + n
    return total, count


# ---- generation --------------------------------------------------------------------------------------------------


def pick_token(logits: Any, temperature: float, top_p: float, generator: Any = None) -> int:
    """One token from one row of logits: argmax below :data:`GREEDY_BELOW`, else a sample at ``temperature``
    from the smallest set of tokens whose probability reaches ``top_p`` (the most likely token always stays)."""
    import torch

    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, index = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, dim=0) - sorted_p) < top_p
        keep[0] = True  # a top_p below float32's range would otherwise keep none
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(index[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Generated ids as text, special tokens left out."""
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int | None = None,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Answers to ``prompts`` (the generated text only), batched with left padding.

    Prompts longer than ``max_prompt_tokens`` (default: what the position table leaves after ``max_new_tokens``)
    are cut on the left, so a chat's generation prompt stays. Stops at :func:`stop_token_ids`. Greedy unless
    ``temperature`` reaches :data:`GREEDY_BELOW`; ``seed`` makes sampling repeatable."""
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    table = positions(getattr(model, "config", None))
    if max_prompt_tokens is None:
        max_prompt_tokens = max(1, table - max_new_tokens) if table is not None else None
    stop = sorted(stop_token_ids(tokenizer, model))
    sampled = temperature >= GREEDY_BELOW
    options: dict[str, Any] = {"do_sample": sampled}
    if sampled:
        options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    device = next(model.parameters(), torch.empty(0)).device
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    answers: list[str] = []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
            for start in range(0, len(prompts), max(1, batch_size)):
                batch = tokenizer(
                    [str(p) for p in prompts[start : start + max(1, batch_size)]],
                    add_special_tokens=add_special_tokens,
                    padding=True,
                    truncation=max_prompt_tokens is not None,
                    max_length=max_prompt_tokens,
                    return_tensors="pt",
                ).to(device)
                out = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop or None,
                    **options,
                )
                width = batch["input_ids"].shape[1]
                for row in out.cpu().tolist():
                    answers.append(decode(tokenizer, _until_stop(row[width:], stop)))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return answers


def _until_stop(ids: Sequence[int], stop: Sequence[int]) -> list[int]:
    """The generated ids before the first stop token (the padding after it goes too)."""
    stops = set(stop)
    out: list[int] = []
    for token in ids:
        if token in stops:
            break
        out.append(int(token))
    return out
