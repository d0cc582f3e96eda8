"""RFC 9457 problem+json: the one shape of every 4xx/5xx body, in every service."""

from http import HTTPStatus
from typing import Any

import orjson
from starlette.responses import Response

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """Raised anywhere in a request to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers


def problem_body(
    status: int, detail: str, title: str | None = None, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    title = title or HTTPStatus(status).phrase
    body: dict[str, Any] = {
        "type": f"/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return body


def problem_response(problem: Problem) -> Response:
    return Response(
        orjson.dumps(problem_body(problem.status, problem.detail, problem.title, problem.errors)),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def raw_problem(status: int, detail: str) -> tuple[dict[str, Any], bytes]:
    """Headers and body for ASGI middleware that answers before the app runs."""
    body = orjson.dumps(problem_body(status, detail))
    return {"content-type": PROBLEM_JSON, "content-length": str(len(body))}, body
