"""Bearer-token guard for stock administration."""

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.problems import Problem

bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN")


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if credentials is None:
        raise Problem(401, "stock administration needs `Authorization: Bearer <ADMIN_TOKEN>`",
                      headers={"WWW-Authenticate": "Bearer"})
    expected: str = request.app.state.admin_token
    # Constant-time comparison: response time says nothing about how much of a guess was right.
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise Problem(403, "the bearer token is not the admin token")


Admin = Depends(require_admin)
