"""The edge rules of every HTTP process (API.md §4), written once.

The gateway's lean path (gateway/proxy.py), the orders fast lane (orders/fastlane.py) and the
FastAPI shell of every service (shared/web.py) all take these from here, so the first process
that sees a request and every service behind it apply the same rules and cannot disagree."""

import re
import uuid
from urllib.parse import unquote

# API.md §4: a client's X-Request-ID is kept only if it is 1-128 of these; anything else would
# travel into outbox rows, AMQP headers and log lines (a 140 kB id once stopped the relay).
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_TEXT = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# An escape that decodes to a dot, a slash or a backslash: a path holding one could be resolved
# by an upstream (or an HTTP client on the way) to a path other than the one the gateway matched.
_HIDDEN = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_DECODE_ROUNDS = 4


def new_request_id() -> bytes:
    return uuid.uuid4().hex.encode()


def request_id(value: bytes | None) -> bytes:
    """The id a request is answered and logged with: the client's if it obeys the rule, else new."""
    if value and REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def valid_request_id(value: str) -> bool:
    return REQUEST_ID_TEXT.fullmatch(value) is not None


def hides_dot_or_slash(raw_path: bytes) -> bool:
    """True if the raw path encodes a dot, slash or backslash, however many times encoded
    (`%2e`, `%252e`, `%25252E`, ...), or holds a dot segment."""
    text = raw_path.decode("latin-1")
    for _ in range(_DECODE_ROUNDS):
        if "/." in text and any(part in (".", "..") for part in text.split("/")):
            return True
        if "%" not in text:
            return False
        if _HIDDEN.search(text):
            return True
        text = unquote(text)
    return True  # still escaped after that many rounds: no client of ours does that
