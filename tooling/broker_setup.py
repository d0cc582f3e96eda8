"""`python -m tooling.broker_setup`: the services' RabbitMQ users under compose, made through
the management API with the administrator's credentials (compose's `migrate` service runs it).

Each service user may declare and use only the project's exchanges and queues (not
`amq.default`) and publish on `inventory.events` only its own events (topic permissions), as
tooling/access.py does for the local broker. Passwords come from the environment (required)."""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote

from shared.messaging import EXCHANGE
from tooling.access import EVENTS, RESOURCES

Request = tuple[str, dict[str, str]]  # path, JSON body (all PUT)


def requests(passwords: dict[str, str], vhost: str = "/") -> list[Request]:
    """The management API calls that make each service's user (pure, for the unit test)."""
    v = quote(vhost, safe="")
    calls: list[Request] = []
    for service, password in passwords.items():
        calls.append((f"/api/users/{service}", {"password": password, "tags": ""}))
        calls.append((f"/api/permissions/{v}/{service}",
                      {"configure": RESOURCES, "write": RESOURCES, "read": RESOURCES}))
        calls.append((f"/api/topic-permissions/{v}/{service}",
                      {"exchange": EXCHANGE, "write": f"^({'|'.join(EVENTS[service])})$", "read": ".*"}))
    return calls


def _put(base: str, auth: str, path: str, body: dict[str, str]) -> None:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Authorization": auth, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def main() -> None:
    base = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://rabbitmq:15672").rstrip("/")
    user, password = os.environ["RABBITMQ_ADMIN_USER"], os.environ["RABBITMQ_ADMIN_PASSWORD"]
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    passwords = {service: os.environ[f"{service.upper()}_AMQP_PASSWORD"] for service in EVENTS}
    for service, secret in passwords.items():
        if secret == service:
            sys.exit(f"{service.upper()}_AMQP_PASSWORD must not be the user name")
    deadline = time.monotonic() + 60
    for path, body in requests(passwords):
        while True:
            try:
                _put(base, auth, path, body)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)  # the management API comes up a little after the AMQP port
    print(f"broker users ready: {', '.join(passwords)}")


if __name__ == "__main__":
    main()
