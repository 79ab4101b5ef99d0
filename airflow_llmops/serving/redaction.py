"""Redaction of personal data in generated text (the ``redact_output_pii`` serving option).

The detectors are the data layer's (:mod:`airflow_llmops.ml.data.pii`: e-mail addresses, phone numbers, card
numbers, IBANs, IP addresses, secrets); each match becomes its placeholder (``[EMAIL]``, ``[PHONE]``...).

Streaming: text reaches the client only once no match can still grow into it. :class:`StreamRedactor` holds back
the *tail* of the text it has not released: the last whitespace-free run (an address, a key, an IP, the digits of
a number being written) together with the number-like groups right before it (runs of digits, capitals and
``+ ( ) . / -`` separated by spaces: a phone, card or IBAN written in groups), and everything from an unclosed
``-----BEGIN`` of a private key on. Whatever is before the tail is redacted and released; a match that reaches
into the tail is held with it. When the generation ends the rest is redacted and released. The released pieces
are redacted with up to :data:`LOOKBACK` characters of the text before them as context (so ``password: ...``
whose value arrives in a later chunk is still seen as a secret). The final text of a streamed answer is exactly
the concatenation of its chunks. Nothing here logs text; the request log receives the redacted text only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import re
import threading
from collections.abc import Callable, Mapping

from airflow_llmops.ml.data.pii import PLACEHOLDERS, pii_spans
from airflow_llmops.serving.models import Generation

#: Characters of already released text that a newly released piece is matched with (context for look-behinds
#: and for ``key: value`` secrets).
LOOKBACK = 64
_TAIL = re.compile(r"(?:[0-9A-Z+()./-]+[ \t]+)*\S*\Z")
_KEY_BEGIN = "-----BEGIN"
_KEY_END = "-----END"

TextCallback = Callable[[str], None]
CountCallback = Callable[[Mapping[str, int]], None]


def held_from(text: str, start: int = 0) -> int:
    """Where the tail of ``text[start:]`` that may still become (part of) a match begins (see the module)."""
    cut = len(text)
    match = _TAIL.search(text, start)
    if match is not None:
        cut = match.start()
    begin = text.rfind(_KEY_BEGIN, start)
    if begin >= 0 and text.find(_KEY_END, begin) < 0:
        cut = min(cut, begin)
    return cut


class StreamRedactor:
    """Redacts one generation: :meth:`feed` the text deltas as they come, :meth:`finish` with the final text.

    :param emit: where released (redacted) text goes; None when nothing streams.
    """

    def __init__(self, emit: TextCallback | None = None) -> None:
        self._emit = emit
        self._raw = ""
        self._released = 0  # characters of _raw already redacted and released
        self._out: list[str] = []
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    @property
    def text(self) -> str:
        """The redacted text released so far."""
        return "".join(self._out)

    def feed(self, delta: str) -> None:
        with self._lock:
            self._raw += delta
            piece = self._release(final=False)
        if piece and self._emit is not None:
            self._emit(piece)

    def finish(self, full_text: str) -> str:
        """Release what is held and return the whole redacted text. ``full_text`` is the generation's text: when
        the deltas fed so far are its start, the rest is fed first; otherwise (a model that revised its text)
        the answer is ``full_text`` redacted whole, and only its unreleased part is streamed."""
        with self._lock:
            if full_text.startswith(self._raw):
                self._raw = full_text
                piece = self._release(final=True)
                result = self.text
            else:
                streamed = self.text
                self._raw, self._released, self._out, self.counts = full_text, 0, [], {}
                self._release(final=True)
                result = self.text
                piece = result[len(streamed) :] if result.startswith(streamed) else ""
        if piece and self._emit is not None:
            self._emit(piece)
        return result

    def _release(self, *, final: bool) -> str:
        raw, start = self._raw, self._released
        cut = len(raw) if final else held_from(raw, start)
        base = max(0, start - LOOKBACK)
        # A match that began in released text (the tail rule missed it) has its unreleased part redacted.
        spans = [(max(s + base, start), e + base, kind) for s, e, kind in pii_spans(raw[base:]) if e + base > start]
        for s, e, _ in spans:  # a match that reaches past the cut is held whole
            if s < cut < e:
                cut = s
        if cut <= start:
            return ""
        pieces: list[str] = []
        cursor = start
        for s, e, kind in spans:
            if e > cut:
                break
            pieces += [raw[cursor:s], PLACEHOLDERS[kind]]
            cursor = e
            self.counts[kind] = self.counts.get(kind, 0) + 1
        pieces.append(raw[cursor:cut])
        self._released = cut
        piece = "".join(pieces)
        self._out.append(piece)
        return piece


def redacting_future(
    inner: concurrent.futures.Future[Generation], redactor: StreamRedactor, count: CountCallback
) -> concurrent.futures.Future[Generation]:
    """A future of ``inner``'s generation with its text redacted by ``redactor`` (released in full first, so a
    stream gets its last chunk before the result); cancelling it cancels ``inner``."""
    outer: concurrent.futures.Future[Generation] = concurrent.futures.Future()

    def finished(done: concurrent.futures.Future[Generation]) -> None:
        if done.cancelled():
            outer.cancel()
            return
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            err = done.exception()
            if err is not None:
                outer.set_exception(err)
                return
            generation = done.result()
            try:
                text = redactor.finish(generation.text)
            except Exception as failure:  # the client's stream callback failed: the answer fails as it would
                outer.set_exception(failure)
                return
            count(redactor.counts)
            outer.set_result(dataclasses.replace(generation, text=text))

    def cancelled(done: concurrent.futures.Future[Generation]) -> None:
        if done.cancelled():
            inner.cancel()

    outer.add_done_callback(cancelled)
    inner.add_done_callback(finished)
    return outer
