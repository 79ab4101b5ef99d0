"""A tiny chat model whose greedy answer is written in its weights: a GPT-2 that maps each token to the next one of
a script (a bigram table), so tests know exactly what it says.

The transformer blocks add nothing (their output projections are zero, the position table is zero), so the last
hidden state is the layer-normed embedding of the current token; the (untied) LM head scores the script's next
token ~50 logits above anything else. The script: the last token of the chat template's generation prompt →
the reply's tokens → ``<|user|>`` → the generation prompt's last token again, so a decoder that does not stop at
the role marker writes the reply over and over (a fabricated next turn each time).
"""

from __future__ import annotations

from pathlib import Path

from airflow_llmops.ml.data.chat import ROLE_MARKERS

QUESTION = "Where is my parcel?"
CONTEXT = 256


def build_scripted_chat_lm(folder: Path, reply: str, *, corpus: list[str] | None = None) -> tuple[Path, list[int]]:
    """Save the model to ``folder``; returns it and the reply's token ids (the script between prompt and marker)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from airflow_llmops.ml.training import data as D
    from airflow_llmops.ml.training import models as M

    texts = (corpus or []) + [reply] * 20 + [QUESTION] * 5
    tokenizer = M.train_bpe_tokenizer(texts, CONTEXT, ROLE_MARKERS)
    D.ensure_chat_template(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    start = tokenizer(str(prompt), add_special_tokens=False)["input_ids"][-1]
    reply_ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    script = [start, *reply_ids, user]
    if len(set(script)) != len(script):
        raise ValueError(f"the script repeats a token, a bigram model cannot say it: {script}")
    vocab, width = len(tokenizer), 128
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=CONTEXT,
        n_embd=width,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        embeddings = torch.randn(vocab, width)
        model.transformer.wte.weight.copy_(embeddings)
        normed = torch.nn.functional.layer_norm(embeddings, (width,), eps=config.layer_norm_epsilon)
        head = torch.zeros(vocab, width)
        for current, following in zip(script, [*script[1:], start], strict=True):
            head[following] += 50.0 * normed[current] / width
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, reply_ids
