"""Conversational-AI pipeline: a chat assistant fine-tuned, gated, served and rolled out on the local platform."""

from __future__ import annotations

from airflow_llmops.pipelines import chat_pipeline

DOC = """
### LLMOps — conversational-AI pipeline

The reference lifecycle for a **chat assistant** on the `local` platform (the stages of `llmops_local`, with
`task=chat` throughout):

* `plan` validates the run's specs; `prepare` reads conversations in the OpenAI messages format — the bundled
  corpus (`chatterbot://english?topics=...`, each dialog a conversation of alternating user/assistant turns) or a
  JSONL / Parquet / CSV file given as the Param `dataset_source` — normalises, deduplicates (exact and MinHash) and
  splits them by a stable hash, published as the Asset `x-llmops://datasets/chatterbot-conversations`;
* `validate` gates them with Great Expectations (format, roles, role order, empty turns, invalid characters,
  personal data per message, the rendered token budget) and quarantines bad conversations with a reason;
* `train` fine-tunes a causal LM with the loss on the assistant's turns only (the offline tiny GPT-2 by default, or
  the Param `model`); the chat template is saved with the model, so evaluation and serving render prompts as
  training did;
* `quantize` tries torch dynamic int8 and keeps it within `max_quality_drop` percent of perplexity (otherwise the
  full-precision model goes on: `fallback_to_source`; ONNX export of a causal LM is not supported);
* `evaluate` scores it against the registry's champion on held-out conversations: perplexity on the assistant's
  tokens and ROUGE-L / BLEU / chrF of greedy answers, and gates on the Param `gate_metric` (perplexity, lower is
  better, by default; `rouge_l`, `bleu` or `chrf`, higher is better);
* `register` makes it a version of `chatterbot-chat-assistant` (its own registered model: never compared with the
  topic classifier's champion); `deploy` loads it on the local endpoint `chatterbot-chat`, which answers the OpenAI
  `/v1/chat/completions` API (streaming included, continuous batching); `rollout` moves traffic by the plan
  (canary 10 → 50 → 100 % by default) on live latency and errors and, on success, moves the `champion` alias.

Talk to it with any OpenAI client: `OpenAI(base_url="<endpoint url>/v1", api_key="unused")`, then
`client.chat.completions.create(model="<variant>", messages=[{"role": "user", "content": "hello"}])`.

* **Schedule**: daily, latest only (a backfilled run stops after `register`), as `llmops_local`.
* **Artifacts**: `[llmops] artifact_root``/llmops_chat/<run_id>/`.
"""

dag = chat_pipeline(
    dag_id="llmops_chat",
    platform="local",
    description="Chat assistant lifecycle on the local platform",
    tags=["llmops", "local", "chat"],
    doc_md=DOC,
)
