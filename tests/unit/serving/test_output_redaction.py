"""Output PII redaction (airflow_llmops.serving.redaction): a stream cut anywhere gives exactly the whole text's
redaction, no chunk ever carries a piece of a match, and the answer's future carries the redacted text."""

from __future__ import annotations

import concurrent.futures
import random

import pytest

from airflow_llmops.ml.data.pii import find_pii, redact
from airflow_llmops.serving.models import Generation
from airflow_llmops.serving.redaction import StreamRedactor, held_from, redacting_future

TEXT = (
    "Sure! Write to bob.smith@example.com or call +1 555 123 4567, card 4111 1111 1111 1111, "
    "IBAN DE89 3704 0044 0532 0130 00, password: hunter22abc, server 10.1.2.3.\nThanks, Bob"
)
SECRETS = [v for values in find_pii(TEXT).values() for v in values]


def test_the_fixture_text_holds_every_kind() -> None:
    assert set(find_pii(TEXT)) == {"email", "phone", "credit_card", "iban", "secret", "ip_address"}


@pytest.mark.parametrize("seed", range(40))
def test_a_stream_cut_anywhere_is_the_whole_texts_redaction(seed: int) -> None:
    rnd = random.Random(seed)
    chunks: list[str] = []
    redactor = StreamRedactor(chunks.append)
    i = 0
    while i < len(TEXT):
        n = rnd.randint(1, 6)
        redactor.feed(TEXT[i : i + n])
        i += n
    final = redactor.finish(TEXT)
    whole, counts = redact(TEXT)
    assert final == "".join(chunks) == whole
    assert redactor.counts == counts
    for secret in SECRETS:  # no chunk holds even the first few characters of a match
        assert not any(secret[:4] in chunk for chunk in chunks if secret[:4] not in whole)


def test_text_before_the_tail_is_released_at_once() -> None:
    chunks: list[str] = []
    redactor = StreamRedactor(chunks.append)
    redactor.feed("The parcel left the depot ")
    assert chunks == ["The parcel left the depot "]
    redactor.feed("mail bob@exa")
    assert "".join(chunks) == "The parcel left the depot mail "  # the address is held
    redactor.feed("mple.com today")
    assert "".join(chunks) == "The parcel left the depot mail [EMAIL] "


def test_held_from_keeps_number_groups_and_an_unclosed_key_block() -> None:
    assert held_from("call +1 555 12") == len("call ")
    assert held_from("key -----BEGIN PRIVATE KEY-----\nabc def\n") == len("key ")
    assert held_from("plain words end here ") == len("plain words end here ")


def test_the_answers_future_carries_the_redacted_text_and_counts() -> None:
    inner: concurrent.futures.Future[Generation] = concurrent.futures.Future()
    seen: list[dict[str, int]] = []
    outer = redacting_future(inner, StreamRedactor(), lambda c: seen.append(dict(c)))
    inner.set_result(Generation("mail bob@example.com now", "stop", 3, 7))
    assert outer.result(timeout=1) == Generation("mail [EMAIL] now", "stop", 3, 7)
    assert seen == [{"email": 1}]


def test_cancelling_the_answer_cancels_the_generation() -> None:
    inner: concurrent.futures.Future[Generation] = concurrent.futures.Future()
    outer = redacting_future(inner, StreamRedactor(), lambda c: None)
    assert outer.cancel()
    assert inner.cancelled()
