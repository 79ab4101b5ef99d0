"""A tiny GPT-2 (built from a config, byte-level BPE tokenizer trained on the texts) trained for a few dozen steps on
real dialog text, so that greedy decoding and perplexity mean something; shared by the causal-LM quantization and
export tests. A few seconds on one core."""

from __future__ import annotations

from pathlib import Path


def dialog_texts(dataset: Path, split: str = "train") -> list[str]:
    """``prompt<eos>response<eos>`` texts of a prepared dialog split, as causal-LM training renders them."""
    import pandas as pd

    from airflow_llmops.ml.training.data import lm_texts
    from airflow_llmops.ml.training.models import EOS

    return lm_texts(pd.read_parquet(dataset / f"{split}.parquet"), EOS)


def build_tiny_gpt2(
    folder: Path, texts: list[str], *, layers: int = 2, width: int = 64, steps: int = 60, context: int = 64
) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from airflow_llmops.ml.training import models as M

    tokenizer = M.train_bpe_tokenizer(texts, context)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=max(2, width // 32),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        picks = torch.randint(0, len(texts), (16,), generator=generator).tolist()
        batch = tokenizer(
            [texts[i] for i in picks], padding=True, truncation=True, max_length=context, return_tensors="pt"
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path, tokenizer_from: Path) -> Path:
    """A one-layer Llama (random weights) with another model's tokenizer: an architecture the GPT-2-only export and
    ONNX paths must refuse by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return folder
