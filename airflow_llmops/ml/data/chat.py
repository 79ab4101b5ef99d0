"""Conversations in the OpenAI messages format: read, normalise, check and render them.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": "..."}`` objects: an optional
leading system message, then user and assistant turns alternating, ending with an assistant turn. Preparation
keeps a malformed conversation as it is (only its well-formed parts are normalised) so that validation can
quarantine it with a reason naming the message, instead of it vanishing on the way.

No pandas or Airflow here: the training code renders conversations with :func:`render_chat`.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
FORMAT_EXAMPLE = (
    '{"messages": [{"role": "system", "content": "You are a helpful assistant."}, '
    '{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}]}'
)
_TRAILING_WS = re.compile(r"[^\S\n]+\n")


def render_chat(messages: Iterable[Mapping[str, Any]]) -> str:
    """The text a model sees for a conversation: ``<|role|>\\ncontent\\n`` per message, in order.

    Token budgets (``max_tokens``) are counted on this text, so training must render conversations with it too.
    """
    return "".join(f"<|{message['role']}|>\n{message['content']}\n" for message in messages)


#: The role markers :func:`render_chat` writes; a tokenizer trained for chat keeps each one as a single token.
ROLE_MARKERS = tuple(f"<|{role}|>" for role in ROLES)

#: :func:`render_chat` as a Hugging Face chat template (Jinja), for tokenizers that have none: the same text, plus
#: the tokenizer's EOS token after each assistant turn, which ends the turn (the model learns to stop there).
#: ``add_generation_prompt`` appends ``<|assistant|>\n``, the prompt a reply is generated from.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _plain(value: Any) -> Any:
    """JSON-ready Python: numpy arrays (Parquet list columns) to lists, numpy scalars to Python, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return _plain(value.tolist())  # numpy array or scalar
    return value


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def loads_messages(value: Any) -> Any:
    """A cell of a messages column as plain Python: a JSON string is parsed (a string that is not JSON stays a
    string, for validation to reject), a Parquet list becomes a list; ``None`` for a missing value."""
    if is_missing(value):
        return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return _plain(value)


def dumps_messages(value: Any) -> str:
    """Canonical JSON of a conversation (sorted keys, no ASCII escaping): equal conversations, equal strings."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def normalise_content(text: str) -> str:
    """NFKC, unified line breaks, no trailing spaces on a line, stripped; unlike plain text rows the line breaks
    stay (code and lists in an answer keep their shape)."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _TRAILING_WS.sub("\n", text).strip()


def normalise_messages(value: Any) -> Any:
    """A conversation with string roles folded to lower case and string contents normalised; anything malformed
    (not a list, a message that is not an object, a non-string role or content) is left as it is."""
    conversation = loads_messages(value)
    if not isinstance(conversation, list):
        return conversation
    out: list[Any] = []
    for message in conversation:
        if not isinstance(message, dict):
            out.append(message)
            continue
        clean = dict(message)
        if isinstance(clean.get("role"), str):
            clean["role"] = unicodedata.normalize("NFKC", clean["role"]).strip().lower()
        if isinstance(clean.get("content"), str):
            clean["content"] = normalise_content(clean["content"])
        out.append(clean)
    return out


def render_lenient(conversation: Any) -> str:
    """:func:`render_chat` for any value, malformed parts shown as JSON (to count tokens of every record)."""
    if not isinstance(conversation, list):
        return "" if conversation is None else dumps_messages(conversation)
    parts = []
    for message in conversation:
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
            role_text = role if isinstance(role, str) else dumps_messages(role)
            content_text = content if isinstance(content, str) else dumps_messages(content)
            parts.append(f"<|{role_text}|>\n{content_text}\n")
        else:
            parts.append(f"{dumps_messages(message)}\n")
    return "".join(parts)


def string_contents(conversation: Any) -> list[tuple[int, str]]:
    """(message index, content) of every message whose content is a string."""
    if not isinstance(conversation, list):
        return []
    return [
        (index, message["content"])
        for index, message in enumerate(conversation)
        if isinstance(message, dict) and isinstance(message.get("content"), str)
    ]


def count_turns(value: Any) -> int:
    conversation = loads_messages(value)
    return len(conversation) if isinstance(conversation, list) else 0


@dataclass(frozen=True)
class Issue:
    """One reason a conversation is rejected: the check, the message it concerns (None: the whole
    conversation) and what is wrong."""

    check: str
    message: int | None
    detail: str = ""

    @property
    def reason(self) -> str:
        if self.message is None:
            return f"{self.check}:{self.detail}"
        return f"{self.check}:message {self.message}" + (f" ({self.detail})" if self.detail else "")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _format_issues(conversation: Any) -> list[Issue]:
    if not isinstance(conversation, list):
        return [Issue("chat_format", None, f"messages is not a list ({_type_name(conversation)})")]
    if not conversation:
        return [Issue("chat_format", None, "no messages")]
    issues = []
    for index, message in enumerate(conversation):
        if not isinstance(message, dict):
            issues.append(Issue("chat_format", index, f"not an object: {_type_name(message)}"))
            continue
        for key in ("role", "content"):
            if key not in message:
                issues.append(Issue("chat_format", index, f"no {key}"))
            elif not isinstance(message[key], str):
                issues.append(Issue("chat_format", index, f"{key} is not a string: {_type_name(message[key])}"))
    return issues


def _sequence_issue(roles: list[str]) -> Issue | None:
    """Optional leading system message, then user/assistant alternating from user, ending with assistant."""
    expected = "user"
    for index in range(1 if roles[0] == "system" else 0, len(roles)):
        role = roles[index]
        if role != expected:
            if role == "system":
                return Issue("role_sequence", index, "a system message is only allowed first")
            return Issue("role_sequence", index, f"expected {expected!r}, got {role!r}")
        expected = "assistant" if expected == "user" else "user"
    if "assistant" not in roles:
        return Issue("role_sequence", None, "no assistant turn")
    if roles[-1] != "assistant":
        return Issue("role_sequence", len(roles) - 1, f"ends with {roles[-1]!r}; the last turn must be the assistant's")
    return None


def conversation_issues(value: Any) -> list[Issue]:
    """Every structural problem of one conversation: ``chat_format`` (not a list of objects with string role and
    content), ``unknown_role``, ``empty_turn`` (empty or whitespace-only content) and ``role_sequence`` (checked
    only when every role is known, so that one bad role is reported once)."""
    conversation = loads_messages(value)
    issues = _format_issues(conversation)
    if not isinstance(conversation, list):
        return issues
    roles: list[str] = []
    for index, message in enumerate(conversation):
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), message.get("content")
        if isinstance(role, str):
            if role in ROLES:
                roles.append(role)
            else:
                issues.append(Issue("unknown_role", index, f"{role!r}; use one of {', '.join(ROLES)}"))
        if isinstance(content, str) and not content.strip():
            issues.append(Issue("empty_turn", index))
    if roles and len(roles) == len(conversation):
        sequence = _sequence_issue(roles)
        if sequence is not None:
            issues.append(sequence)
    return issues
