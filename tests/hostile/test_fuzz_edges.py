"""Fuzzing the request head through the gateway (not only bodies, which tests/e2e/test_fuzz.py
covers from the OpenAPI document): generated methods, paths (segments with escapes, dots,
slashes, bytes no client would send) and headers (names and values), on a raw socket. Whatever
comes, the answer is never a 5xx, never a hang, always carries a request id by the rule, every
4xx is problem+json, and no internal endpoint answers through a public route."""

import re
import socket
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.raw import Answer, parse
from tooling.stack import Stack

pytestmark = pytest.mark.hostile

RULE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TRICKY = ["..", ".", "%2e", "%2E%2e", "%252e", "%2f", "%252F", "%5c", "%00", "%0a", "%0D", "%ff",
          "%", "%%", "%zz", "%25", ";", "~", "orders", "stores", "stock", "metrics", "health",
          "ready", "docs", "openapi.json", "import", "events", "movements", "restock", "S1", "A"]
INTERNAL = (b"http_requests_total", b"python_gc_objects", b'"checks"', b"swagger-ui")

segment = st.one_of(st.sampled_from(TRICKY), st.text(alphabet=TOKEN + "%/.", max_size=12),
                    st.binary(max_size=6).map(lambda b: b.decode("latin-1")))
paths = st.tuples(st.sampled_from(["/orders", "/stores", "/stock", ""]),
                  st.lists(segment, max_size=6)).map(lambda p: p[0] + "/" + "/".join(p[1]))
queries = st.one_of(st.just(""), st.text(alphabet=TOKEN + "=&%;+", max_size=40).map(lambda q: "?" + q))
header_names = st.one_of(st.text(alphabet=TOKEN, min_size=1, max_size=30),
                         st.sampled_from(["X-Request-ID", "Content-Length", "Transfer-Encoding",
                                          "Content-Type", "Last-Event-ID", "Idempotency-Key",
                                          "Authorization", "Host", "Expect", "Connection"]))
header_values = st.one_of(st.text(alphabet=TOKEN + " \t,;=\"/:", max_size=60),
                          st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                          st.sampled_from(["-1", "0", "99999999999999999999", "chunked", "100-continue",
                                           "gzip, chunked", "application/json", "Bearer x", "x" * 200]))
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "FOO"])


def _send(port: int, data: bytes) -> tuple[Answer | None, float]:
    """The answer (None: the server closed without one, as for a malformed head it cut) and the
    seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # no more bytes: a request waiting for a body ends now
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    return (parse(raw) if raw else None), time.monotonic() - started


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=methods, path=paths, query=queries,
       headers=st.lists(st.tuples(header_names, header_values), max_size=6))
def test_a_generated_head_never_gets_a_5xx_a_hang_or_a_bare_4xx(
    hostile_stack: Stack, method: str, path: str, query: str, headers: list[tuple[str, str]]
) -> None:
    lines = [f"{method} {path}{query} HTTP/1.1", "Host: gateway", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    answer, seconds = _send(hostile_stack.ports["gateway"], data)
    assert seconds < 12, f"{seconds:.1f} s for {data[:200]!r}"
    if answer is None:
        return  # cut without an answer: only a head the server could not read gets that
    assert answer.status < 500, (answer.status, answer.body[:300], data[:300])
    request_id = answer.header(b"x-request-id")
    assert request_id is not None and RULE.fullmatch(request_id), (answer.headers, data[:300])
    if answer.status >= 400 and method != "HEAD":
        answer.problem(answer.status)
        assert orjson.loads(answer.body)["status"] == answer.status
    if path.startswith(("/orders", "/stores", "/stock")):
        assert not any(leak in answer.body for leak in INTERNAL), (data[:300], answer.body[:300])
