"""Chat data through a real Airflow run (dag.test): PrepareDatasetOperator reads conversations, and
ValidateDatasetOperator's Great Expectations gate quarantines the bad ones with reasons naming the message."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

EMAIL = "jane.doe@example.com"


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def good(i: int) -> dict:
    word = hashlib.sha256(str(i).encode()).hexdigest()[:12]
    return {
        "messages": [
            turn("system", "You answer questions about parcels."),
            turn("user", f"Where is parcel {word}?"),
            turn("assistant", f"Parcel {word} left the depot {i % 7} days ago and arrives tomorrow."),
        ]
    }


BAD = {
    "two users in a row": (
        [turn("user", "two users in a row"), turn("user", "hello?"), turn("assistant", "Here.")],
        "role_sequence:message 1 (expected 'assistant', got 'user')",
    ),
    "an empty answer": ([turn("user", "an empty answer"), turn("assistant", "   ")], "empty_turn:message 1"),
    "mail me": ([turn("user", f"mail me at {EMAIL}"), turn("assistant", "I will.")], "pii:email:message 0"),
}


def _run(tmp_path: Path, source: str, validation: dict):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_chat", folder="tests/dags")
    conf = {"source": source, "artifact_root": str(tmp_path / "artifacts"), "validation": validation}
    return dag.test(run_conf=conf)


def _state(run, task_id: str) -> str:
    return str(run.get_task_instance(task_id).state)


def _jsonl(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return f"file://{path}"


def _dataset(tmp_path: Path) -> Path:
    return next((tmp_path / "artifacts").rglob("datasets/chats"))


def _first_user_turns(frame: pd.DataFrame) -> dict[str, str]:
    """First user message → the quarantine reason (or the whole row's messages)."""
    out = {}
    for messages, reason in zip(frame["messages"], frame["quarantine_reasons"], strict=True):
        first = next(m["content"] for m in json.loads(messages) if m["role"] == "user")
        out[first.split(" at ")[0]] = reason
    return out


def _rows() -> list[dict]:
    rows = [good(i) for i in range(60)]
    rows[10:10] = [{"messages": messages} for messages, _ in BAD.values()]
    return rows


def test_personal_data_in_a_message_fails_the_gate_and_every_bad_conversation_is_quarantined(airflow_db, tmp_path):
    run = _run(tmp_path, _jsonl(tmp_path, _rows()), {"pii_action": "fail", "max_quarantine_fraction": 0.1})
    assert _state(run, "prepare") == "success" and _state(run, "validate") == "failed"
    folder = _dataset(tmp_path)
    quarantine = pd.read_parquet(folder / "validation" / "quarantine.parquet")
    assert _first_user_turns(quarantine) == {key.split(" at ")[0]: reason for key, (_, reason) in BAD.items()}
    assert quarantine["record_id"].str.fullmatch(r"[0-9a-f]{64}").all()  # the conversation's id
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert summary["suite_name"] == "llmops_chat_dataset" and summary["pii_found"] == {"email": 1}
    assert summary["quarantine_reasons"] == {"empty_turn": 1, "pii:email": 1, "role_sequence": 1}
    assert not (folder / "validated").exists()


def test_redacted_personal_data_continues_and_only_the_malformed_conversations_are_quarantined(airflow_db, tmp_path):
    run = _run(tmp_path, _jsonl(tmp_path, _rows()), {"pii_action": "redact", "max_quarantine_fraction": 0.05})
    assert _state(run, "validate") == "success"
    folder = _dataset(tmp_path)
    prepared = json.loads((folder / "manifest.json").read_text())
    assert prepared["task"] == "chat" and prepared["output_rows"] == 63
    assert sum(split["turns"] for split in prepared["splits"].values()) == 60 * 3 + 3 + 2 + 2
    quarantine = pd.read_parquet(folder / "validation" / "quarantine.parquet")
    assert set(_first_user_turns(quarantine).values()) == {BAD["two users in a row"][1], BAD["an empty answer"][1]}
    validated = json.loads((folder / "validated" / "manifest.json").read_text())
    assert validated["task"] == "chat" and validated["quarantined_rows"] == 2
    assert sum(split["conversations"] for split in validated["splits"].values()) == 61
    assert validated["validation"]["pii_redacted"] == {"email": 1}
    clean = pd.concat(pd.read_parquet(folder / "validated" / f"{s}.parquet") for s in ("train", "validation", "test"))
    conversations = [json.loads(m) for m in clean["messages"]]
    assert [turn("user", "mail me at [EMAIL]"), turn("assistant", "I will.")] in conversations
    assert all(m[-1]["role"] == "assistant" and m[-1]["content"].strip() for m in conversations)


def test_chatterbot_corpus_as_chat_gives_conversations_that_pass_the_gate(airflow_db, tmp_path):
    run = _run(tmp_path, "chatterbot://english?topics=greetings,humor,food", {"pii_action": "redact"})
    assert _state(run, "prepare") == "success" and _state(run, "validate") == "success"
    manifest = json.loads((_dataset(tmp_path) / "validated" / "manifest.json").read_text())
    splits = manifest["splits"].values()
    conversations, turns = sum(s["conversations"] for s in splits), sum(s["turns"] for s in splits)
    assert conversations > 20 and turns >= 2 * conversations
    assert manifest["quarantined_rows"] == 0


def test_a_jsonl_without_the_messages_field_fails_naming_the_field_the_file_and_the_format(airflow_db, tmp_path, capfd):
    source = _jsonl(tmp_path, [{"text": "hello", "label": "greeting"}])
    run = _run(tmp_path, source, {})
    assert _state(run, "prepare") == "failed"
    out, err = capfd.readouterr()
    logs = out + err
    assert f"{source} has no field 'messages' (found ['text', 'label'])" in logs
    assert '{"messages": [{"role": "system", "content":' in logs and "Set messages_field" in logs
