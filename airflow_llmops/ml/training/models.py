"""Which model to train and how to build it: offline defaults first, then local paths, then the hub.

``tiny-gpt2`` is not downloaded: it is a 2-layer GPT-2 built from a config, with a byte-level BPE tokenizer trained
on the job's own training split, so a causal LM trains on a machine with no network at all.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoTokenizer, GPT2Config, PretrainedConfig, PreTrainedTokenizerFast

from airflow_llmops.ml.data.chat import ROLE_MARKERS
from airflow_llmops.ml.models import TINY_GPT2, resolve_model_path
from airflow_llmops.ml.training.errors import TrainingInputError
from airflow_llmops.specs.training import DEFAULT_CAUSAL_LM, DEFAULT_CLASSIFIER, LoraSpec, TrainingSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TINY_VOCAB = 4096
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: str | None  # None: built from ``config`` (tiny-gpt2)
    config: PretrainedConfig

    @property
    def is_default(self) -> bool:
        return self.name.lower() in (DEFAULT_CLASSIFIER.lower(), DEFAULT_CAUSAL_LM)


def tiny_gpt2_config(*, vocab_size: int, max_seq_length: int, eos_id: int = 0, pad_id: int = 1) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_seq_length,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that is not a folder is a path that does not exist."""
    return name.startswith(("/", ".", "~", "file://")) or name.count("/") > 1 or "\\" in name


def resolve_model(spec: TrainingSpec) -> ModelSource:
    """Find the model's config without loading weights; an unknown model is an input error naming it."""
    name = spec.resolved_model
    if name.lower() == TINY_GPT2:
        if spec.task not in ("causal_lm", "chat"):
            raise TrainingInputError(
                f"model {name!r} is a causal LM built from a config; for task {spec.task!r} use "
                f"{DEFAULT_CLASSIFIER!r}, a local model folder or a Hugging Face id"
            )
        config = tiny_gpt2_config(vocab_size=TINY_VOCAB, max_seq_length=spec.max_seq_length)
        return ModelSource(name=name, path=None, config=config)
    try:
        path = resolve_model_path(name.removeprefix("file://"))
    except ValueError as err:
        raise TrainingInputError(str(err)) from None
    if os.path.isdir(os.path.expanduser(path)):
        path = os.path.abspath(os.path.expanduser(path))
        return ModelSource(name=name, path=path, config=_load_config(name, path, local=True))
    if _looks_like_path(name):
        raise TrainingInputError(f"model {name!r}: folder {path} does not exist; give an existing model folder")
    return ModelSource(name=name, path=path, config=_load_config(name, path, local=False))


def check_sequence_length(source: ModelSource, max_seq_length: int) -> None:
    """Positions past the model's position table fail deep inside the forward pass; say so up front."""
    limit = getattr(source.config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < max_seq_length:
        raise TrainingInputError(
            f"max_seq_length={max_seq_length} exceeds the {limit} positions of model {source.name!r}; use "
            f"max_seq_length <= {limit}"
        )


def _load_config(name: str, path: str, *, local: bool) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError, KeyError) as err:
        raise TrainingInputError(
            f"unknown model {name!r}: it is not an offline default ({DEFAULT_CLASSIFIER}, {DEFAULT_CAUSAL_LM}), "
            f"not a local model folder, and the Hugging Face hub could not provide it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check the name, give a "
            "local path, or run where the hub is reachable (HF_HUB_OFFLINE unset)"
        ) from None
    return config


def classification_label2id(source: ModelSource, labels: list[str]) -> dict[str, int]:
    """Label → head index. A model that already has a classification head keeps its own mapping when the label
    sets agree; a different label set is an input error rather than a silently re-purposed head."""
    wanted = {label: i for i, label in enumerate(labels)}
    architectures = source.config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return wanted
    head = {str(v): int(k) for k, v in (source.config.id2label or {}).items()}
    if set(head) == set(labels):
        return head
    generic = all(_GENERIC_LABEL.match(label) for label in head)
    if generic and len(head) == len(labels):
        return wanted
    raise TrainingInputError(
        f"model {source.name!r} already has a classification head for {len(head)} labels {sorted(head)}, but "
        f"the dataset's training split has {len(labels)} labels {labels}; train from the base model (e.g. "
        f"{DEFAULT_CLASSIFIER!r}) or use a dataset with the head's label set"
    )


def _texts_fingerprint(texts: list[str], max_seq_length: int, specials: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256(f"{TINY_VOCAB}:{max_seq_length}:{','.join(specials)}".encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    return digest.hexdigest()


def _wrap(tokenizer: Tokenizer, max_seq_length: int) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=max_seq_length
    )
    # A chat tokenizer's role markers are special tokens of the tokenizer file; naming them to the wrapper too
    # makes ``decode(..., skip_special_tokens=True)`` drop them.
    markers = [marker for marker in ROLE_MARKERS if tokenizer.token_to_id(marker) is not None]
    if markers:
        wrapped.add_special_tokens({"additional_special_tokens": markers})  # type: ignore[dict-item]
    return wrapped


def train_bpe_tokenizer(
    texts: list[str], max_seq_length: int, extra_special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token) with EOS and PAD specials, plus
    ``extra_special_tokens`` (a chat model's role markers), each one id that the text around it never merges into."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=[EOS, PAD, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer, max_seq_length)


def tiny_gpt2_tokenizer(
    texts: list[str],
    max_seq_length: int,
    cache: Path,
    checkpoint: Path | None,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """The tokenizer a resumed checkpoint was trained with, else the cached one for these texts, else a new one.

    Callers run this on the local main process first (``TrainingArguments.main_process_first``): it trains and
    caches, the other ranks then load the same file, so every rank has identical token ids.
    """
    if checkpoint is not None and (checkpoint / "tokenizer.json").is_file():
        return _wrap(Tokenizer.from_file(str(checkpoint / "tokenizer.json")), max_seq_length)
    fingerprint = _texts_fingerprint(texts, max_seq_length, tuple(extra_special_tokens))
    stored, stamp = cache / "tokenizer.json", cache / "fingerprint"
    if stored.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == fingerprint:
        return _wrap(Tokenizer.from_file(str(stored)), max_seq_length)
    wrapped = train_bpe_tokenizer(texts, max_seq_length, extra_special_tokens)
    cache.mkdir(parents=True, exist_ok=True)
    # Atomic replace: on a shared job dir, several nodes' local main processes may write at the same time.
    tmp = cache / f".tokenizer.{os.getpid()}.json"
    wrapped.backend_tokenizer.save(str(tmp))
    os.replace(tmp, stored)
    stamp_tmp = cache / f".fingerprint.{os.getpid()}"
    stamp_tmp.write_text(fingerprint, encoding="utf-8")
    os.replace(stamp_tmp, stamp)
    return wrapped


def pretrained_tokenizer(source: ModelSource) -> Any:
    """The model's own tokenizer, given a pad token where it has none (GPT-style models pad with EOS)."""
    assert source.path is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=os.path.isdir(source.path))
    except (OSError, ValueError) as err:
        raise TrainingInputError(f"cannot load the tokenizer of model {source.name!r}: {err}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TrainingInputError(f"the tokenizer of model {source.name!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: TrainingSpec, source: ModelSource, tokenizer: Any, label2id: dict[str, int]) -> torch.nn.Module:
    """Weights in fp32 (mixed precision is the Trainer's autocast), plus LoRA adapters when the spec asks."""
    # Imported here: the modeling classes are the heavy part of transformers, and the checks before this
    # point should answer in seconds.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2LMHeadModel

    model: PreTrainedModel
    if source.path is None:
        config = tiny_gpt2_config(
            vocab_size=len(tokenizer),
            max_seq_length=spec.max_seq_length,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif spec.task == "classification":
        id2label = {i: label for label, i in label2id.items()}
        model = AutoModelForSequenceClassification.from_pretrained(
            source.path,
            num_labels=len(label2id),
            id2label=id2label,
            label2id=label2id,
            dtype=torch.float32,
            local_files_only=os.path.isdir(source.path),
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch.float32, local_files_only=os.path.isdir(source.path)
        )
        embeddings = cast(torch.Tensor, model.get_input_embeddings().weight)
        if len(tokenizer) > embeddings.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return apply_lora(model, spec.lora, spec.task) if spec.lora else model


def apply_lora(model: PreTrainedModel, lora: LoraSpec, task: str) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    try:
        return get_peft_model(model, config)  # type: ignore[no-any-return]
    except ValueError as err:
        raise TrainingInputError(
            f"LoRA cannot wrap model type {model.config.model_type!r}: {err}; set lora.target_modules to the "
            "names of its attention projections"
        ) from None


def exportable(model: torch.nn.Module, *, merge: bool = True) -> Any:
    """A LoRA model is merged into its base weights, so the saved model loads with plain ``from_pretrained``;
    ``merge=False`` keeps the PEFT model, whose ``save_pretrained`` writes the adapters and ``adapter_config.json``
    (naming the base model in ``base_model_name_or_path``)."""
    merge_and_unload = getattr(model, "merge_and_unload", None)
    return merge_and_unload() if merge and callable(merge_and_unload) else model
