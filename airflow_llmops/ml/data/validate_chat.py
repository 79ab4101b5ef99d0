"""The validation gate's plan for conversations: one row per conversation, checked message by message.

A conversation that fails a check is quarantined with reasons naming the message, e.g.
``unknown_role:message 1 ('bot'; use one of system, user, assistant)``, ``role_sequence:message 2 (expected
'user', got 'assistant')``, ``empty_turn:message 3``, ``pii:email:message 0`` or ``token_length:700>512`` (tokens of
the conversation rendered by :func:`~airflow_llmops.ml.data.chat.render_chat`). Each row check has a helper column
(``__chat_*``) that a built-in Great Expectations expectation checks, so the report and the quarantine agree.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Literal

import pandas as pd

from airflow_llmops.ml.data.chat import (
    conversation_issues,
    dumps_messages,
    loads_messages,
    render_lenient,
    string_contents,
)
from airflow_llmops.ml.data.pii import redact
from airflow_llmops.ml.data.validate import (
    CHAT_COLUMN,
    _dataset_helpers,
    _Plan,
    token_and_label_checks,
)
from airflow_llmops.ml.data.validation_suite import CHAT_ROW_CHECKS, INVALID_CHARS
from airflow_llmops.specs.validation import PiiType, ValidationSpec

_INVALID = re.compile(INVALID_CHARS)


def _messages_list(indices: list[int]) -> str:
    return f"message {indices[0]}" if len(indices) == 1 else f"messages {', '.join(map(str, indices))}"


def _redact_conversations(
    conversations: list[Any], types: list[PiiType]
) -> tuple[list[Any], dict[str, list[int]], dict[str, list[list[int]]]]:
    """Each conversation with personal data in its contents replaced by placeholders, the count per row of each
    type, and per type and row the indices of the messages it was found in."""
    counts: dict[str, list[int]] = {kind: [0] * len(conversations) for kind in types}
    where: dict[str, list[list[int]]] = {kind: [[] for _ in conversations] for kind in types}
    redacted: list[Any] = []
    for row, conversation in enumerate(conversations):
        contents = string_contents(conversation) if types else []
        if not contents:
            redacted.append(conversation)
            continue
        copy = [dict(m) if isinstance(m, dict) else m for m in conversation]
        for index, content in contents:
            new_text, found = redact(content, types)
            copy[index]["content"] = new_text
            for kind, count in found.items():
                counts[kind][row] += count
                where[kind][row].append(index)
        redacted.append(copy)
    return redacted, counts, where


def plan_chat(df: pd.DataFrame, spec: ValidationSpec, *, builtin: bool) -> _Plan:
    """The chat counterpart of :func:`airflow_llmops.ml.data.validate._plan`."""
    present = [CHAT_COLUMN] if CHAT_COLUMN in df.columns else []
    out, gx_frame = df.copy(), df.copy()
    types = list(spec.pii_types)
    raw = list(df[CHAT_COLUMN]) if present else [None] * len(df)
    conversations = [loads_messages(value) for value in raw]
    redacted, counts, where = _redact_conversations(conversations, types)
    per_row = pd.DataFrame(counts, index=df.index, columns=types, dtype="int64")
    if present:
        # GX sees JSON text with personal data replaced; only conversations that had some are re-serialised for
        # what continues (the others keep their bytes).
        changed = per_row.sum(axis=1) > 0
        shown = [
            dumps_messages(new) if hit or not isinstance(old, str) else old
            for old, new, hit in zip(raw, redacted, changed, strict=True)
        ]
        gx_frame[CHAT_COLUMN] = pd.Series(shown, index=df.index, dtype=object)
        if spec.pii_action == "redact":
            out[CHAT_COLUMN] = gx_frame[CHAT_COLUMN].where(changed, df[CHAT_COLUMN])
    remaining = per_row.copy()
    if spec.pii_action == "redact":
        # Re-scan what continues so the GX check proves the redaction left nothing behind.
        remaining = pd.DataFrame(_redact_conversations(redacted, types)[1], index=df.index, columns=types)
    pii_found = {kind: int(n) for kind, n in per_row.sum().items() if n}
    for kind in types:
        gx_frame[f"__pii_{kind}"] = (remaining if spec.pii_action == "redact" else per_row)[kind]
    kept = redacted if spec.pii_action == "redact" else conversations
    token_source: Literal["n_tokens", "whitespace"] = "n_tokens" if "n_tokens" in df.columns else "whitespace"
    token_column = "n_tokens" if token_source == "n_tokens" else "__whitespace_tokens"
    if token_source == "whitespace":
        gx_frame[token_column] = pd.Series([len(render_lenient(c).split()) for c in kept], index=df.index)
    label = spec.label_column if spec.label_column and spec.label_column in df.columns else None
    plan = _Plan(
        out=out,
        gx_frame=gx_frame,
        text_columns=[CHAT_COLUMN],
        present_text=present,
        label=label,
        label_domain=label,
        token_column=token_column,
        token_source=token_source,
        pii_found=pii_found,
        pii_redacted=dict(pii_found) if spec.pii_action == "redact" else {},
        row_checks={},
        details={},
        chat=True,
    )
    _dataset_helpers(plan, df, spec)
    if builtin and present:
        _chat_row_checks(plan, spec, conversations)
    if builtin:
        token_and_label_checks(plan, spec)
    if spec.pii_action == "fail":
        for kind in types:
            reasons = [f"pii:{kind}:{_messages_list(found)}" if found else "" for found in where[kind]]
            plan.row_checks[f"pii:{kind}"] = (per_row[kind] > 0, pd.Series(reasons, index=df.index))
    return plan


def _invalid_chars(content: str, max_ratio: float) -> bool:
    if max_ratio > 0:
        return len(_INVALID.findall(content)) / max(len(content), 1) > max_ratio
    return _INVALID.search(content) is not None


def _chat_row_checks(plan: _Plan, spec: ValidationSpec, conversations: list[Any]) -> None:
    """Per-conversation verdicts, each with a helper column that the matching built-in expectation checks."""
    index = plan.gx_frame.index
    reasons: dict[str, list[str]] = {check: [""] * len(index) for check in CHAT_ROW_CHECKS}
    for row, conversation in enumerate(conversations):
        by_check: dict[str, list[str]] = defaultdict(list)
        for issue in conversation_issues(conversation):
            by_check[issue.check].append(issue.reason)
        bad = [i for i, text in string_contents(conversation) if _invalid_chars(text, spec.max_invalid_char_ratio)]
        if bad:
            by_check["invalid_chars:messages"].append(f"invalid_chars:{_messages_list(bad)}")
        for check, found in by_check.items():
            reasons[check][row] = "; ".join(found)
    for check, (helper, _description) in CHAT_ROW_CHECKS.items():
        reason = pd.Series(reasons[check], index=index, dtype=object)
        mask = reason != ""
        plan.gx_frame[helper] = mask.astype("int64")
        plan.row_checks[check] = (mask, reason)
