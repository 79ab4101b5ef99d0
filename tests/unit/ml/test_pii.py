"""PII detectors: each kind is found and redacted, checksums reject look-alikes, ordinary text stays untouched."""

from __future__ import annotations

import pytest

from airflow_llmops.ml.data.pii import PLACEHOLDERS, find_pii, iban_valid, luhn_valid, redact

# Fictional or documentation values only. Token-shaped strings are assembled so secret scanners skip this file.
POSITIVES = [
    ("email", "mail me at john.doe+ml@example.co.uk.", "john.doe+ml@example.co.uk"),
    ("email", "Contact: a_b@sub.example.org", "a_b@sub.example.org"),
    ("phone", "call +44 20 7946 0958 now", "+44 20 7946 0958"),
    ("phone", "Tel:+1-202-555-0143", "+1-202-555-0143"),
    ("phone", "office (202) 555-0143 ext", "(202) 555-0143"),
    ("phone", "or 202.555.0143", "202.555.0143"),
    ("phone", "Berlin 030 12345678", "030 12345678"),
    ("phone", "Paris 06 12 34 56 78", "06 12 34 56 78"),
    ("phone", "DE +49 (0)30 1234567", "+49 (0)30 1234567"),
    ("phone", "E.164 +14155552671", "+14155552671"),
    ("credit_card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("credit_card", "card 4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("credit_card", "amex 378282246310005", "378282246310005"),
    ("credit_card", "mc 5555555555554444.", "5555555555554444"),
    ("iban", "IBAN DE89 3704 0044 0532 0130 00 THEN pay", "DE89 3704 0044 0532 0130 00"),
    ("iban", "to GB82WEST12345698765432", "GB82WEST12345698765432"),
    ("ip_address", "server 192.168.1.10:8080", "192.168.1.10"),
    ("ip_address", "from 10.0.0.1.", "10.0.0.1"),
    ("ip_address", "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("ip_address", "link-local fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
    ("ip_address", "addr 2001:db8::1.", "2001:db8::1"),
    ("secret", "key " + "sk-" + "proj-abcDEF1234567890abcdef12", "sk-" + "proj-abcDEF1234567890abcdef12"),
    ("secret", "aws " + "AKIA" + "IOSFODNN7EXAMPLE", "AKIA" + "IOSFODNN7EXAMPLE"),
    ("secret", "gh " + "ghp_" + "a1B2" * 9, "ghp_" + "a1B2" * 9),
    ("secret", "slack " + "xoxb-" + "123456789012-abcdefghij", "xoxb-" + "123456789012-abcdefghij"),
    ("secret", 'config api_key="Zx8fQ2LmR7tY4wPa9KdE"', "Zx8fQ2LmR7tY4wPa9KdE"),
    ("secret", "token: 7f9c2ba4e88f827d616045507605853e", "7f9c2ba4e88f827d616045507605853e"),
    ("secret", "password=hunter22x", "hunter22x"),
]

NEGATIVES = [
    "In 2023 we sold 1500 units for $2,499.99 on 12/03/2024 at 10:30:15.",
    "Python 3.11.7 and numpy 1.26.4 were released on 2024-01-15.",
    "Order 1234567890123456 shipped",  # 16 digits, fails Luhn
    "card 4111 1111 1111 1112",  # Luhn off by one
    "DE89 3704 0044 0532 0130 01",  # IBAN check digits wrong
    "GB82 WEST 1234 5698 7654 33",
    "The ratio was 0.123 456; at 12:30:45 the MAC 00:1A:2B:3C:4D:5E answered.",
    "std::vector and a :: b",
    "password: required, tokens: 512, secret = banana",
    "ISBN 978-3-16-148410-0, temperature 37.5, build 1.2.3.4.5 and 10.0.19045.3693",
    "see page 12, lines 3-4; call 911 or 112",
    "born 07.03.2024 10:30",
    "a population of 8 000 000 000 people",
    "Office hours are 9-17, room 1024, postcode 10115.",
    "Our API_KEY environment variable must be set.",
]


@pytest.mark.parametrize(("kind", "text", "value"), POSITIVES)
def test_each_kind_is_found_and_redacted(kind, text, value):
    assert find_pii(text) == {kind: [value]}
    assert find_pii(text, [kind]) == {kind: [value]}
    redacted, counts = redact(text, [kind])
    assert counts == {kind: 1}
    assert value not in redacted
    assert redacted == text.replace(value, PLACEHOLDERS[kind])


@pytest.mark.parametrize("text", NEGATIVES)
def test_ordinary_text_is_not_flagged(text):
    assert find_pii(text) == {}
    assert redact(text) == (text, {})


def test_dotted_quad_is_an_ip_but_a_three_part_version_is_not():
    assert find_pii("release 1.2.3.4 is out") == {"ip_address": ["1.2.3.4"]}
    assert find_pii("release 3.11.7 is out") == {}
    assert find_pii("octets 256.1.1.1 and 01.02.03.04") == {}


def test_checksums():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("4111-1111")
    assert iban_valid("DE89370400440532013000")
    assert iban_valid("gb82 west 1234 5698 7654 32")
    assert not iban_valid("DE89370400440532013001")
    assert not iban_valid("DE8937")


def test_several_kinds_in_one_text_redacted_with_counts():
    text = (
        "Write to jane@example.org or bob@example.com, call +44 20 7946 0958, "
        "pay with 4111 1111 1111 1111 from 10.1.2.3."
    )
    redacted, counts = redact(text)
    assert counts == {"email": 2, "phone": 1, "credit_card": 1, "ip_address": 1}
    assert redacted == "Write to [EMAIL] or [EMAIL], call [PHONE], pay with [CARD] from [IP]."


def test_only_requested_kinds_are_redacted_and_a_card_is_never_a_phone():
    text = "card 4111 1111 1111 1111, mail x@example.com"
    assert find_pii(text, ["phone"]) == {}
    redacted, counts = redact(text, ["email"])
    assert counts == {"email": 1}
    assert "4111 1111 1111 1111" in redacted and "[EMAIL]" in redacted


def test_iban_digits_are_not_reported_as_a_card():
    assert find_pii("IBAN DE89 3704 0044 0532 0130 00") == {"iban": ["DE89 3704 0044 0532 0130 00"]}


def test_secret_assignment_keeps_the_key_and_private_keys_are_redacted_whole():
    assert redact("api_key=Zx8fQ2LmR7tY4wPa9KdE;")[0] == "api_key=[SECRET];"
    block = "-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----"
    assert redact(f"key:\n{block}\nend") == ("key:\n[SECRET]\nend", {"secret": 1})


def test_unknown_type_is_an_error():
    with pytest.raises(ValueError, match="unknown PII type"):
        find_pii("text", ["passport"])  # type: ignore[list-item]
