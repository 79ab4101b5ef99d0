"""Detect and redact personal data and secrets in free text: regexes for candidates, checksums to confirm them.

Every detector runs on every text and overlapping matches are resolved by a fixed priority (secret, email,
IBAN, card, IP, phone), so a valid card number is never reported as a phone number even when only phones are
asked for. Nothing here logs or stores the matched values; callers get them back only from :func:`find_pii`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from airflow_llmops.specs.validation import ALL_PII, PiiType

PLACEHOLDERS: dict[PiiType, str] = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "credit_card": "[CARD]",
    "iban": "[IBAN]",
    "ip_address": "[IP]",
    "secret": "[SECRET]",
}

Span = tuple[int, int]


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of payment card numbers (digits only)."""
    if not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616 mod-97 check: the country code and check digits move to the end, letters become 10..35."""
    iban = candidate.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def shannon_entropy(value: str) -> float:
    """Bits per character; random API tokens score well above natural-language words."""
    if not value:
        return 0.0
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![\w-])"
)

# Card numbers are written unbroken or in the printed groups (4-4-4-4[-3], Amex 4-6-5) with one separator kind.
# The look-behinds keep them out of longer digit sequences and out of the body of a (mistyped) IBAN.
_CARD = re.compile(
    r"(?<![\w.,-])(?<!\d[ -])(?<![A-Z]{2}\d{2} )(?:\d{13,19}"
    r"|\d{4}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{3})?"
    r"|\d{4}(?P<amex>[ -])\d{6}(?P=amex)\d{5})"
    r"(?![\w]|[ -]?\d)"
)

_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![\w])")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# The look-arounds reject dotted runs with more than four parts (version strings such as 1.2.3.4.5).
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\d)")

_PHONE = re.compile(
    r"(?<![\w.+/-])(?:"
    r"(?P<intl>\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){2,6})"
    # Without a "+", a number right after other digits is more likely one of a run of figures.
    r"|(?<!\d[ .-])(?P<us>\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}(?P<ussep>[ .-])\d{3}(?P=ussep)\d{4})"
    r"|(?<!\d[ .-])(?P<national>0\d{1,4}(?:[ /.-]?\d{2,4}){2,5})"
    r")(?![\w]|[ .-]?\d)"
)
_DATE = re.compile(r"\b(?:\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{4}[./-]\d{1,2}[./-]\d{1,2})\b")

_SECRET_TOKENS = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style keys
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
    r")(?![\w-])"
    r"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----(?:.*?-----END (?:[A-Z]+ )?PRIVATE KEY-----)?",
    re.DOTALL,
)
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?<![\w])(?P<key>api[_-]?key|apikey|access[_-]?key|secret[_-]?key|(?:access|auth|api|bearer)[_-]?token"
    r"|token|secret|client[_-]?secret|password|passwd|pwd)[\"']?\s*(?:[:=]|=>)\s*[\"']?"
    r"(?P<value>[A-Za-z0-9_\-./+=~!@#$%^&*]{8,})"
)


def _accept_whole(match: re.Match[str]) -> Span | None:
    return match.span()


def _accept_card(match: re.Match[str]) -> Span | None:
    digits = re.sub(r"\D", "", match.group())
    # Issuer prefixes start with 2-6; the check cuts random 16-digit ids to the 10 % that pass Luhn anyway.
    if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits):
        return match.span()
    return None


def _accept_iban(match: re.Match[str]) -> Span | None:
    # The greedy pattern may swallow an upper-case word after the IBAN; drop trailing groups until it checks.
    text = match.group()
    while len(text.replace(" ", "")) >= 15:
        if iban_valid(text):
            return match.start(), match.start() + len(text)
        if " " not in text:
            return None
        text = text.rsplit(" ", 1)[0]
    return None


def _accept_ipv6(match: re.Match[str]) -> Span | None:
    candidate = match.group()
    if sum(1 for group in re.split(r"[:.]", candidate) if group) < 2:
        return None  # "::" and "::1" carry no information about a person
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return None  # clock times (12:30:45) and MAC addresses land here
    return match.span()


def _accept_phone(match: re.Match[str]) -> Span | None:
    text = match.group()
    if _DATE.search(text):
        return None
    number = re.sub(r"\D", "", text)
    digits = len(number)
    if len(set(number)) < 3:
        return None  # 000 000 000 and the like are placeholders or quantities, not numbers to dial
    if match.group("intl"):
        ok = 8 <= digits <= 15
    elif match.group("us"):
        ok = digits == 10
    else:
        ok = 9 <= digits <= 13
    return match.span() if ok else None


def _accept_assignment(match: re.Match[str]) -> Span | None:
    value = match.group("value").rstrip(".,;\"'")
    has_letter = any(char.isalpha() for char in value)
    has_digit = any(char.isdigit() for char in value)
    # Passwords are short and low-entropy, so a letter-and-digit mix is the only signal that separates
    # "password: hunter22" from "password: required"; tokens must also look random.
    if match.group("key").lower() in ("password", "passwd", "pwd"):
        ok = len(value) >= 8 and has_letter and has_digit
    else:
        ok = len(value) >= 16 and has_letter and has_digit and shannon_entropy(value) >= 3.0
    return (match.start("value"), match.start("value") + len(value)) if ok else None


@dataclass(frozen=True)
class _Detector:
    kind: PiiType
    pattern: re.Pattern[str]
    accept: Callable[[re.Match[str]], Span | None]


# Order is priority: a span claimed by an earlier detector is not reported again by a later one.
_DETECTORS: tuple[_Detector, ...] = (
    _Detector("secret", _SECRET_TOKENS, _accept_whole),
    _Detector("secret", _SECRET_ASSIGNMENT, _accept_assignment),
    _Detector("email", _EMAIL, _accept_whole),
    _Detector("iban", _IBAN, _accept_iban),
    _Detector("credit_card", _CARD, _accept_card),
    _Detector("ip_address", _IPV4, _accept_whole),
    _Detector("ip_address", _IPV6, _accept_ipv6),
    _Detector("phone", _PHONE, _accept_phone),
)


def pii_spans(text: str) -> list[tuple[int, int, PiiType]]:
    """Non-overlapping ``(start, end, type)`` of every kind of personal data in ``text``, in text order."""
    claimed: list[tuple[int, int, PiiType]] = []
    for detector in _DETECTORS:
        for match in detector.pattern.finditer(text):
            span = detector.accept(match)
            if span is None or span[0] == span[1]:
                continue
            if any(span[0] < end and start < span[1] for start, end, _ in claimed):
                continue
            claimed.append((span[0], span[1], detector.kind))
    return sorted(claimed)


def _wanted(types: Iterable[PiiType] | None) -> set[PiiType]:
    chosen = set(ALL_PII if types is None else types)
    unknown = chosen - set(ALL_PII)
    if unknown:
        raise ValueError(f"unknown PII type(s) {sorted(unknown)}; known: {list(ALL_PII)}")
    return chosen


def find_pii(text: str, types: Iterable[PiiType] | None = None) -> dict[PiiType, list[str]]:
    """The matched values by type (only types that occur), for the types asked (default: all)."""
    wanted = _wanted(types)
    found: dict[PiiType, list[str]] = {}
    for start, end, kind in pii_spans(text):
        if kind in wanted:
            found.setdefault(kind, []).append(text[start:end])
    return found


def redact(text: str, types: Iterable[PiiType] | None = None) -> tuple[str, dict[PiiType, int]]:
    """``text`` with each match of the asked types replaced by its placeholder, and the count per type."""
    wanted = _wanted(types)
    counts: dict[PiiType, int] = {}
    pieces: list[str] = []
    cursor = 0
    for start, end, kind in pii_spans(text):
        if kind not in wanted:
            continue
        pieces += [text[cursor:start], PLACEHOLDERS[kind]]
        cursor = end
        counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return text, counts
    pieces.append(text[cursor:])
    return "".join(pieces), counts
