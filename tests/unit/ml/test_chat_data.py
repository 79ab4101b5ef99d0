"""Chat data: conversations read, normalised, deduplicated and split as one record each; every conversation checked
message by message, a bad one quarantined with a reason naming the message (the gate's pandas side, no GX)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from airflow_llmops.ml.data.chat import conversation_issues, render_chat
from airflow_llmops.ml.data.chatterbot import load_chatterbot
from airflow_llmops.ml.data.errors import DatasetError
from airflow_llmops.ml.data.prepare import prepare_records, serialise
from airflow_llmops.ml.data.sources import read_table
from airflow_llmops.ml.data.validate_chat import plan_chat
from airflow_llmops.specs import DatasetSpec, SpecValidationError, TrainingSpec, ValidationSpec

SPEC = DatasetSpec(name="chats", source="file:///chats.jsonl", task="chat")


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def conversation(i: int) -> list[dict[str, str]]:
    """A distinct conversation (a hash word keeps any two of them far from near-duplicates)."""
    word = hashlib.sha256(str(i).encode()).hexdigest()[:12]
    return [
        turn("user", f"What is the weather like in {word} this morning?"),
        turn("assistant", f"In {word} it is sunny with {i % 30} degrees and a light breeze."),
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prepared_rows(prepared) -> pd.DataFrame:
    return pd.concat([frame.assign(split=name) for name, frame in prepared.splits.items()], ignore_index=True)


# --------------------------------------------------------------------------- rendering


def test_render_chat_writes_one_role_tag_and_content_per_message():
    messages = [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello!\nHow can I help?")]
    assert render_chat(messages) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!\nHow can I help?\n"
    assert render_chat([]) == ""


# --------------------------------------------------------------------------- reading and preparing


def test_jsonl_conversations_become_one_normalised_record_each(tmp_path):
    rows = [{"messages": conversation(i)} for i in range(30)]
    rows[0] = {
        "messages": [
            turn(" User ", "Hi  there\r\n"),
            turn("ASSISTANT", "Here:\r\n\r\n```py\nx = 1   \n```  "),
        ],
        "meta": "ignored",
    }
    records, rejected = read_table(write_jsonl(tmp_path / "chats.jsonl", rows), "jsonl")
    prepared = prepare_records(records, SPEC, rejected_input=rejected)
    frame = prepared_rows(prepared)
    assert len(frame) == 30
    assert list(prepared.splits["train"].columns) == ["record_id", "messages", "n_tokens"]
    by_first = {json.loads(m)[0]["content"]: json.loads(m) for m in frame["messages"]}
    # Roles are folded to lower case; contents keep their line breaks (code keeps its shape), lose trailing spaces.
    assert by_first["Hi  there"] == [turn("user", "Hi  there"), turn("assistant", "Here:\n\n```py\nx = 1\n```")]
    manifest = prepared.manifest
    assert manifest["task"] == "chat"
    assert sum(s["conversations"] for s in manifest["splits"].values()) == 30
    assert sum(s["turns"] for s in manifest["splits"].values()) == 60
    assert manifest["splits"]["train"]["turns"] == 2 * manifest["splits"]["train"]["conversations"]


def test_parquet_lists_and_json_strings_in_csv_read_as_the_same_conversations(tmp_path):
    rows = [{"messages": conversation(i)} for i in range(12)]
    from_jsonl = prepare_records(read_table(write_jsonl(tmp_path / "c.jsonl", rows), "jsonl")[0], SPEC)
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")  # a list<struct<role, content>> column
    from_parquet = prepare_records(read_table(tmp_path / "c.parquet", "parquet")[0], SPEC)
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_csv(tmp_path / "c.csv", index=False)
    from_csv = prepare_records(read_table(tmp_path / "c.csv", "csv")[0], SPEC)
    expected = prepared_rows(from_jsonl)
    for other in (from_parquet, from_csv):
        assert prepared_rows(other).equals(expected)


def test_each_conversation_keeps_its_split_and_the_output_is_byte_identical_when_reordered(tmp_path):
    rows = [{"messages": conversation(i)} for i in range(200)]
    first = serialise(prepare_records(pd.DataFrame(rows), SPEC))
    second = serialise(prepare_records(pd.DataFrame(rows[::-1]), SPEC))
    assert first == second
    manifest = json.loads(first["manifest.json"])
    assert manifest["splits"]["train"]["conversations"] > manifest["splits"]["test"]["conversations"] > 0


def test_duplicate_and_empty_conversations_are_removed_with_reasons():
    base = conversation(1)
    near = [base[0], turn("assistant", base[1]["content"] + "!")]
    rows = [
        {"messages": base},
        {"messages": [turn("user", base[0]["content"] + "   "), base[1]]},  # equal once normalised
        {"messages": near},
        {"messages": []},
        {"messages": None},
        {"messages": conversation(2)},
    ]
    prepared = prepare_records(pd.DataFrame(rows), SPEC)
    reasons = sorted(prepared.removed["quarantine_reasons"].str.split(":").str[0])
    assert reasons == ["empty", "empty", "exact_duplicate", "near_duplicate_of"]
    assert prepared.manifest["output_rows"] == 2


def test_malformed_conversations_are_kept_for_the_gate_to_quarantine():
    rows = [{"messages": conversation(1)}, {"messages": [turn("bot", "beep")]}, {"messages": "not a conversation"}]
    kept = prepared_rows(prepare_records(pd.DataFrame(rows), SPEC))
    assert sorted(kept["messages"].map(json.loads).map(type).map(lambda t: t.__name__)) == ["list", "list", "str"]


def test_tokens_are_counted_on_the_rendered_conversation():
    messages = conversation(3)
    seen: list[str] = []

    def count(texts: list[str]) -> list[int]:
        seen.extend(texts)
        return [len(text) for text in texts]

    prepared = prepare_records(pd.DataFrame({"messages": [messages]}), SPEC, count_tokens=count, tokenizer_name="x")
    assert seen == [render_chat(messages)]
    assert prepared_rows(prepared)["n_tokens"].tolist() == [len(render_chat(messages))]
    whitespace = prepare_records(pd.DataFrame({"messages": [messages]}), SPEC)
    assert prepared_rows(whitespace)["n_tokens"].tolist() == [len(render_chat(messages).split())]


def test_a_source_without_the_messages_field_names_the_field_the_file_and_the_format(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"conversation": conversation(1)}])
    records, _ = read_table(path, "jsonl")
    with pytest.raises(DatasetError) as caught:
        prepare_records(records, SPEC)
    message = str(caught.value)
    assert f"{path} has no field 'messages' (found ['conversation'])" in message
    assert '{"messages": [{"role": "system", "content":' in message and "set messages_field" in message.lower()
    renamed = SPEC.model_copy(update={"messages_field": "conversation"})
    assert prepare_records(records, renamed).manifest["output_rows"] == 1


def test_conversations_prepared_as_text_point_to_task_chat():
    with pytest.raises(DatasetError, match="holds conversations \\('messages'\\): set task='chat'"):
        prepare_records(pd.DataFrame({"messages": [conversation(1)]}), DatasetSpec(name="t", source="file:///x"))


def test_chat_is_a_dataset_task_and_a_training_task():
    assert DatasetSpec(name="c", source="chatterbot://english", task="chat").messages_field == "messages"
    assert TrainingSpec.parse({"task": "chat"}).task == "chat"
    with pytest.raises(
        SpecValidationError, match=r"TrainingSpec\.task: Input should be 'classification', 'causal_lm' or 'chat'"
    ):
        TrainingSpec.parse({"task": "dialog"})


def test_chatterbot_dialogs_become_alternating_conversations_ending_with_the_assistant():
    frame = load_chatterbot("chatterbot://english?topics=conversations,greetings", kind="chat")
    assert list(frame.columns) == ["messages"] and len(frame) > 20
    for messages in frame["messages"]:
        assert conversation_issues(messages) == []
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert max(len(m) for m in frame["messages"]) > 2  # multi-turn dialogs stay whole


# --------------------------------------------------------------------------- the role rules, one reason each


@pytest.mark.parametrize(
    ("messages", "reasons"),
    [
        ([turn("user", "hi"), turn("assistant", "hello")], []),
        ([turn("system", "be kind"), turn("user", "hi"), turn("assistant", "hello")], []),
        ([turn("user", "a"), turn("assistant", "b"), turn("user", "c"), turn("assistant", "d")], []),
        (
            [turn("user", "hi"), turn("bot", "hello")],
            ["unknown_role:message 1 ('bot'; use one of system, user, assistant)"],
        ),
        (
            [turn("user", "hi"), turn("user", "again"), turn("assistant", "hello")],
            ["role_sequence:message 1 (expected 'assistant', got 'user')"],
        ),
        (
            [turn("assistant", "hello"), turn("user", "hi")],
            ["role_sequence:message 0 (expected 'user', got 'assistant')"],
        ),
        (
            [turn("user", "hi"), turn("system", "psst"), turn("assistant", "hello")],
            ["role_sequence:message 1 (a system message is only allowed first)"],
        ),
        (
            [turn("user", "hi"), turn("assistant", "hello"), turn("user", "bye")],
            ["role_sequence:message 2 (ends with 'user'; the last turn must be the assistant's)"],
        ),
        ([turn("system", "be kind"), turn("user", "hi")], ["role_sequence:no assistant turn"]),
        ([turn("user", "hi"), turn("assistant", " \n\t")], ["empty_turn:message 1"]),
        (
            ["hi", {"role": "assistant"}, {"role": 1, "content": "x"}],
            [
                "chat_format:message 0 (not an object: str)",
                "chat_format:message 1 (no content)",
                "chat_format:message 2 (role is not a string: int)",
            ],
        ),
        ({"role": "user", "content": "hi"}, ["chat_format:messages is not a list (dict)"]),
        ([], ["chat_format:no messages"]),
    ],
)
def test_each_broken_rule_gives_its_reason_and_message(messages, reasons):
    assert [issue.reason for issue in conversation_issues(messages)] == reasons
    assert [issue.reason for issue in conversation_issues(json.dumps(messages))] == reasons  # as stored


# --------------------------------------------------------------------------- the gate's verdicts per conversation

EMAIL = "jane.doe@example.com"


def gate_frame() -> pd.DataFrame:
    rows = [{"messages": conversation(i)} for i in range(20)]
    rows[0] = {"messages": [turn("user", "hello"), turn("user", "anyone?"), turn("assistant", "yes")]}
    rows[1] = {"messages": [turn("user", "is anyone there"), turn("assistant", "")]}
    rows[2] = {"messages": [turn("user", "a question"), turn("assistant", "an answer"), turn("user", f"mail {EMAIL}")]}
    rows[3] = {"messages": [turn("user", "tell me a long story"), turn("assistant", " ".join(["word"] * 80))]}
    rows[4] = {"messages": [turn("user", f"I am {EMAIL}"), turn("assistant", "Hi, noted.")]}
    return prepared_rows(prepare_records(pd.DataFrame(rows), SPEC))


def verdicts(plan) -> dict[str, str]:
    """record_id → every reason of a failing conversation, as the gate joins them."""
    out: dict[str, list[str]] = {}
    for mask, reason in plan.row_checks.values():
        for record_id, text in zip(plan.out.loc[mask, "record_id"], reason[mask], strict=True):
            out.setdefault(record_id, []).append(text)
    return {record_id: "; ".join(texts) for record_id, texts in out.items()}


def first_content(plan, record_id: str) -> str:
    messages = json.loads(plan.out.set_index("record_id").loc[record_id, "messages"])
    return messages[0]["content"]


def test_bad_conversations_get_reasons_naming_the_message_and_the_budget():
    frame = gate_frame()
    plan = plan_chat(frame, ValidationSpec(max_tokens=60, pii_action="fail"), builtin=True)
    got = {first_content(plan, rid): reason for rid, reason in verdicts(plan).items()}
    assert got == {
        "hello": "role_sequence:message 1 (expected 'assistant', got 'user')",
        "a question": (
            "role_sequence:message 2 (ends with 'user'; the last turn must be the assistant's); pii:email:message 2"
        ),
        "tell me a long story": "token_length:87>60",
        f"I am {EMAIL}": "pii:email:message 0",
        "is anyone there": "empty_turn:message 1",
    }
    # Every check has a helper column that the GX expectation reads: 1 exactly where the conversation fails.
    for check in ("role_sequence", "empty_turn"):
        mask, _ = plan.row_checks[check]
        helper = {"role_sequence": "__chat_role_sequence", "empty_turn": "__chat_empty_turn"}[check]
        assert plan.gx_frame[helper].astype(bool).equals(mask)
    assert plan.pii_found == {"email": 2} and plan.pii_redacted == {}
    assert EMAIL not in " ".join(plan.gx_frame["messages"])  # the report never sees the address


def test_redaction_replaces_personal_data_in_the_message_and_keeps_the_rest():
    frame = gate_frame()
    plan = plan_chat(frame, ValidationSpec(pii_action="redact"), builtin=True)
    assert plan.pii_redacted == {"email": 2}
    assert not any(check.startswith("pii:") for check in plan.row_checks)
    redacted = plan.out[plan.out["messages"].str.contains("[EMAIL]", regex=False)]
    assert len(redacted) == 2 and EMAIL not in " ".join(plan.out["messages"])
    by_first = {json.loads(m)[0]["content"]: json.loads(m) for m in redacted["messages"]}
    assert by_first["I am [EMAIL]"] == [turn("user", "I am [EMAIL]"), turn("assistant", "Hi, noted.")]
    assert int(plan.gx_frame["__pii_email"].sum()) == 0  # the re-scan finds nothing left
    untouched = ~frame["messages"].str.contains(EMAIL, regex=False)
    assert plan.out.loc[untouched, "messages"].equals(frame.loc[untouched, "messages"])
