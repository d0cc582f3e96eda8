"""The issue "Stock as a shop runs it" (API.md §3 and `EstoqueAlterado` in §6), end to end
through the gateway:

- the ledger replays to the figures after a random mix of every kind of change;
- `as_of` rebuilds the figures of any past instant;
- the bulk import (HTTP and `stock-import`) lands whole or not at all, names the bad line, and
  stays correct next to live reservations;
- the live feed (SSE) of a store brings each of its changes once, in order, and resumes exactly
  with `Last-Event-ID`.

What test_stock_api.py already covers (field rules, paging parameters, the admin token) is
not repeated here."""

import asyncio
import itertools
import json
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    assert_invalid,
    assert_problem,
    create_order,
    eventually,
    put_stock,
    random_sku,
    random_store,
    wait_for_status,
)
from tooling.invariants import check_stock_invariants
from tooling.stack import BIN, ROOT, Stack

MOVEMENT_KINDS = {"created", "adjusted", "restocked", "reserved", "released", "expired", "sold"}
ORDER_KINDS = {"reserved", "released", "expired", "sold"}
FINAL = {"confirmed", "cancelled", "expired", "rejected"}
EVENT_FIELDS = {"store_id", "sku", "on_hand", "reserved", "available", "version", "kind"}
CSV_HEADER = "store_id,sku,on_hand\n"


# --------------------------------------------------------------------------------------------
# small helpers


def item_url(store: str, sku: str) -> str:
    return f"/stores/{store}/stock/{sku}"


def figures(item: dict[str, Any]) -> tuple[Any, ...]:
    return (item["store_id"], item["sku"], item["on_hand"], item["reserved"], item["available"],
            item["version"])


async def get_item(client: httpx.AsyncClient, store: str, sku: str) -> dict[str, Any]:
    response = await client.get(item_url(store, sku))
    assert response.status_code == 200, response.text
    return response.json()


async def ledger(client: httpx.AsyncClient, store: str, sku: str, limit: int = 100) -> list[dict[str, Any]]:
    """The item's whole ledger through the public API, page by page."""
    moves: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10_000):
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await client.get(item_url(store, sku) + "/movements", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        moves += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return moves
    raise AssertionError("the movements never stopped paging")


async def store_items(client: httpx.AsyncClient, store: str) -> dict[str, dict[str, Any]]:
    """Every item of the store, by sku, through the paged list."""
    items: dict[str, dict[str, Any]] = {}
    cursor = None
    for _ in range(10_000):
        params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"/stores/{store}/stock", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        for item in page["items"]:
            assert item["sku"] not in items, f"{item['sku']} listed twice"
            items[item["sku"]] = item
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the list never stopped paging")


def assert_ledger_replays(item: dict[str, Any], moves: list[dict[str, Any]]) -> None:
    """API.md §3: versions 1..version gap-free, `at` never decreasing, replay = figures."""
    key = (item["store_id"], item["sku"])
    assert [m["version"] for m in moves] == list(range(1, item["version"] + 1)), (key, item, moves[-3:])
    times = [datetime.fromisoformat(m["at"]) for m in moves]
    assert all(t.utcoffset() is not None for t in times), key
    assert all(a <= b for a, b in itertools.pairwise(times)), f"`at` goes back along the ledger of {key}"
    assert {m["kind"] for m in moves} <= MOVEMENT_KINDS, key
    replayed = (sum(m["on_hand_delta"] for m in moves), sum(m["reserved_delta"] for m in moves))
    assert replayed == (item["on_hand"], item["reserved"]), (key, item, replayed)
    for m in moves:  # what each kind does, as §2/§3 name them
        on_hand, reserved = m["on_hand_delta"], m["reserved_delta"]
        shape = {
            "created": on_hand >= 0 and reserved == 0 and m["version"] == 1,
            "adjusted": reserved == 0,
            "restocked": on_hand > 0 and reserved == 0,
            "reserved": on_hand == 0 and reserved > 0,
            "released": on_hand == 0 and reserved < 0,
            "expired": on_hand == 0 and reserved < 0,
            "sold": on_hand < 0 and on_hand == reserved,
        }[m["kind"]]
        assert shape, (key, m)
        assert (m["order_id"] is not None) == (m["kind"] in ORDER_KINDS), (key, m)


async def bounded(limit: int, jobs: Iterable[Awaitable[Any]]) -> list[Any]:
    """Runs the jobs with at most `limit` of them at once."""
    gate = asyncio.Semaphore(limit)

    async def run(job: Awaitable[Any]) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


async def stock_invariants(stack: Stack) -> dict[tuple[str, str], dict[str, int]]:
    conn = await stack.stock_db()
    try:
        return await check_stock_invariants(conn)
    finally:
        await conn.close()


# ----- import helpers ------------------------------------------------------------------------


def csv_of(rows: Iterable[tuple[str, str, Any]]) -> str:
    return CSV_HEADER + "".join(f"{store},{sku},{on_hand}\n" for store, sku, on_hand in rows)


def ndjson_of(rows: Iterable[tuple[str, str, Any]]) -> str:
    return "".join(json.dumps({"store_id": s, "sku": k, "on_hand": n}) + "\n" for s, k, n in rows)


async def post_import(client: httpx.AsyncClient, stack: Stack, body: str, media: str = "text/csv") -> httpx.Response:
    return await client.post("/stock/import", content=body.encode(),
                             headers={**stack.admin, "Content-Type": media})


def assert_names_line(response: httpx.Response, line: int) -> None:
    """A 422 validation problem that names `line` as the bad row's line."""
    errors = assert_invalid(response)
    body = response.json()
    text = body["detail"] + " " + json.dumps(errors)
    assert re.search(rf"line\W{{0,3}}{line}(?!\d)", text, re.IGNORECASE), (
        f"the problem does not name line {line}: {body}")


async def snapshot(client: httpx.AsyncClient, store: str, skus: Iterable[str]) -> dict[str, Any]:
    """Each item's figures and ledger length (None: no such item)."""
    shot: dict[str, Any] = {}
    for sku in skus:
        response = await client.get(item_url(store, sku))
        if response.status_code == 404:
            shot[sku] = None
            continue
        assert response.status_code == 200, response.text
        shot[sku] = (response.json(), len(await ledger(client, store, sku)))
    return shot


# ----- SSE -----------------------------------------------------------------------------------


class Feed:
    """An open `GET /stores/{s}/stock/events`: a background task parses the SSE frames into a
    queue, so every read can be bounded without breaking the stream."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines: list[str] = []
        self.frames: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        frame: dict[str, str] = {}
        async for line in self.response.aiter_lines():
            self.lines.append(line)
            if line == "":
                if frame:
                    await self.frames.put(frame)
                frame = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                frame[name] = frame[name] + "\n" + value if name == "data" and name in frame else value

    async def next(self, timeout: float = 10.0) -> dict[str, str]:
        try:
            return await asyncio.wait_for(self.frames.get(), timeout)
        except TimeoutError:
            broke = self.task.exception() if self.task.done() else None
            raise AssertionError(f"no event within {timeout} s (reader: {broke!r}); "
                                 f"last lines: {self.lines[-6:]}") from None

    def assert_only_stock_events_and_comments(self) -> None:
        for line in self.lines:
            if line == "" or line.startswith(":"):
                continue
            name = line.partition(":")[0]
            assert name in {"event", "id", "data"}, f"a line that is neither a stock event nor a comment: {line!r}"


@asynccontextmanager
async def feed_of(client: httpx.AsyncClient, store: str, last_event_id: str | None = None) -> AsyncIterator[Feed]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with client.stream("GET", f"/stores/{store}/stock/events", headers=headers,
                             timeout=httpx.Timeout(60, connect=10)) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        feed = Feed(response)
        try:
            yield feed
        finally:
            feed.task.cancel()
            await asyncio.gather(feed.task, return_exceptions=True)


def stock_event(frame: dict[str, str], store: str) -> dict[str, Any]:
    """The frame is an `EstoqueAlterado` of `store`; returns its body."""
    assert frame.get("event") == "stock", frame
    assert frame.get("id"), f"a stock event carries an id: {frame}"
    data = json.loads(frame["data"])
    assert EVENT_FIELDS <= set(data), data
    assert data["store_id"] == store, f"an event of another store: {data}"
    assert data["available"] == data["on_hand"] - data["reserved"], data
    assert data["kind"] in MOVEMENT_KINDS, data
    return data


def brief(data: dict[str, Any]) -> tuple[Any, ...]:
    return (data["sku"], data["version"], data["kind"], data["on_hand"], data["reserved"])


# --------------------------------------------------------------------------------------------
# the ledger


async def test_ledger_replays_to_the_figures_after_1000_mixed_operations(short_stack: Stack) -> None:
    """1,000 operations of every kind, 24 at a time, on one store (holds last 3 s here, so the
    orders left alone expire). Then every item's ledger, paged through the API, replays to its
    figures, and each order's movements match how it ended."""
    stack = short_stack
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    store = random_store()
    skus: list[str] = []
    done: Counter[str] = Counter()
    placed: list[str] = []

    async with stack.client() as client:
        for _ in range(10):  # the first ten operations: items to order from
            sku = random_sku("LED")
            await put_stock(client, stack.admin, store, sku, rng.randint(40, 120))
            skus.append(sku)
        done["created"] += 10

        async def create() -> None:
            sku = random_sku("LED")
            response = await client.put(item_url(store, sku), json={"on_hand": rng.randint(20, 100)},
                                        headers=stack.admin)
            assert response.status_code == 201, response.text
            skus.append(sku)
            done["created"] += 1

        async def adjust() -> None:
            sku = rng.choice(skus)
            for _ in range(10):
                item = await get_item(client, store, sku)
                on_hand = item["reserved"] + rng.randint(0, 60)
                response = await client.put(item_url(store, sku), headers=stack.admin,
                                            json={"on_hand": on_hand, "expected_version": item["version"]})
                if response.status_code == 200:
                    assert (response.json()["on_hand"], response.json()["version"]) == (on_hand, item["version"] + 1)
                    done["adjusted"] += 1
                    return
                assert_problem(response, 409)  # it changed between the read and the write
            done["adjust gave up"] += 1

        async def restock() -> None:
            response = await client.post(item_url(store, rng.choice(skus)) + "/restock",
                                         json={"quantity": rng.randint(1, 30)}, headers=stack.admin)
            assert response.status_code == 200, response.text
            done["restocked"] += 1

        async def order(then: str) -> None:
            lines = [(sku, rng.randint(1, 4)) for sku in rng.sample(skus, rng.randint(1, min(3, len(skus))))]
            response = await create_order(client, store, lines, customer="c-ledger")
            assert response.status_code == 202, response.text
            order_id = response.json()["order_id"]
            placed.append(order_id)
            done["ordered"] += 1
            if then == "leave":  # its hold, if any, runs out
                return
            first = await wait_for_status(client, order_id, {"reserved", "rejected", "expired"}, timeout=60)
            if first["status"] != "reserved":
                done[f"{then} skipped"] += 1
                return
            response = await client.post(f"/orders/{order_id}/{then}")
            if then == "confirm":
                assert response.status_code in (202, 410), response.text  # 410: the 3 s ran out
            else:
                assert response.status_code == 202, response.text
            done[then] += 1

        # 1,000 operations in all: the ten creations above, then a random mix where an order's
        # confirm or cancel counts as an operation of its own
        plan: list[Any] = []
        count = 10
        while count < 1000:
            name = rng.choices(["create", "adjust", "restock", "order"], weights=[4, 18, 18, 60])[0]
            if name != "order":
                plan.append({"create": create, "adjust": adjust, "restock": restock}[name])
                count += 1
                continue
            then = rng.choice(["confirm", "cancel", "leave"]) if count < 999 else "leave"
            plan.append(lambda then=then: order(then))
            count += 1 if then == "leave" else 2
        await bounded(24, (operation() for operation in plan))
        print(f"operations: {dict(done)}")

        finals = await bounded(40, (wait_for_status(client, o, FINAL, timeout=120) for o in placed))
        assert {o["status"] for o in finals} >= {"confirmed", "cancelled", "expired"}, Counter(
            o["status"] for o in finals)

        async def nothing_held() -> dict[str, dict[str, Any]]:
            items = await store_items(client, store)
            held = {sku: i["reserved"] for sku, i in items.items() if i["reserved"]}
            assert not held, f"every order has ended, yet units are still held: {held}"
            return items

        items = await eventually(nothing_held, timeout=60, interval=0.25)
        assert sorted(items) == sorted(skus)

        by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
        kinds: Counter[str] = Counter()
        for sku, item in items.items():
            moves = await ledger(client, store, sku, limit=rng.choice([7, 25, 100]))
            assert_ledger_replays(item, moves)
            for m in moves:
                kinds[m["kind"]] += 1
                if m["order_id"] is not None:
                    by_order[m["order_id"]].append({**m, "sku": sku})

    assert set(kinds) == MOVEMENT_KINDS, f"every kind of movement appears: {kinds}"
    for kind in ("created", "adjusted", "restocked"):
        assert kinds[kind] == done[kind], (kind, kinds, done)
    assert set(by_order) <= set(placed), "movements of orders nobody placed"

    for final in finals:  # each order's movements, line by line, say how it ended
        moves = by_order.get(final["order_id"], [])
        wanted = {line["sku"]: line["quantity"] for line in final["items"]}
        per_sku: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for m in sorted(moves, key=lambda m: (m["sku"], m["version"])):
            per_sku[m["sku"]].append((m["kind"], m["on_hand_delta"], m["reserved_delta"]))
        context = (final["order_id"], final["status"], wanted, dict(per_sku))
        if final["status"] == "rejected":
            assert not per_sku, context
            continue
        assert set(per_sku) == set(wanted), f"all lines held or none: {context}"
        endings = {"confirmed": {"sold"}, "expired": {"expired"}, "cancelled": {"released", "expired"}}
        ends = set()
        for sku, q in wanted.items():
            assert len(per_sku[sku]) == 2 and per_sku[sku][0] == ("reserved", 0, q), context
            kind, on_hand_delta, reserved_delta = per_sku[sku][1]
            assert (on_hand_delta, reserved_delta) == ((-q if kind == "sold" else 0), -q), context
            ends.add(kind)
        assert len(ends) == 1 and ends <= endings[final["status"]], context

    figures_in_db = await stock_invariants(stack)
    assert {sku for (s, sku) in figures_in_db if s == store} == set(skus)


# --------------------------------------------------------------------------------------------
# as_of


async def test_as_of_gives_the_figures_observed_at_each_instant(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    seen: list[dict[str, Any]] = []
    async with stack.client() as client:

        async def observe(version: int) -> None:
            async def changed() -> dict[str, Any]:
                item = await get_item(client, store, sku)
                assert item["version"] == version, item
                return item
            seen.append(await eventually(changed, timeout=30))

        await put_stock(client, stack.admin, store, sku, 10)
        await observe(1)
        assert (await client.post(item_url(store, sku) + "/restock", json={"quantity": 5},
                                  headers=stack.admin)).status_code == 200
        await observe(2)
        response = await client.put(item_url(store, sku), json={"on_hand": 12, "expected_version": 2},
                                    headers=stack.admin)
        assert response.status_code == 200, response.text
        await observe(3)
        first = (await create_order(client, store, [(sku, 4)])).json()
        assert (await wait_for_status(client, first["order_id"], {"reserved"}))["status"] == "reserved"
        await observe(4)
        second = (await create_order(client, store, [(sku, 3)])).json()
        await wait_for_status(client, second["order_id"], {"reserved"})
        await observe(5)
        assert (await client.post(f"/orders/{first['order_id']}/confirm")).status_code == 202
        await wait_for_status(client, first["order_id"], {"confirmed"})
        await observe(6)
        assert (await client.post(f"/orders/{second['order_id']}/cancel")).status_code == 202
        await observe(7)  # the release happens on the stock side, after the answer
        assert (await client.post(item_url(store, sku) + "/restock", json={"quantity": 2},
                                  headers=stack.admin)).status_code == 200
        await observe(8)
        assert [(i["on_hand"], i["reserved"]) for i in seen] == [
            (10, 0), (15, 0), (12, 0), (12, 4), (12, 7), (8, 3), (8, 0), (10, 0)]

        async def as_of(instant: datetime) -> httpx.Response:
            return await client.get(item_url(store, sku), params={"as_of": instant.isoformat()})

        instants = [datetime.fromisoformat(i["updated_at"]) for i in seen]
        for item, instant in zip(seen, instants):
            for same in (instant, instant.astimezone(timezone(timedelta(hours=5, minutes=30)))):
                response = await as_of(same)
                assert response.status_code == 200, (same, response.text)
                then = response.json()
                assert figures(then) == figures(item), (same.isoformat(), then, item)
                assert datetime.fromisoformat(then["updated_at"]) == instant, (then, item)

        for earlier, (t0, t1) in zip(seen, itertools.pairwise(instants)):
            assert t1 - t0 >= timedelta(microseconds=2), "changes made one after another have distinct times"
            response = await as_of(t0 + (t1 - t0) / 2)
            assert response.status_code == 200, response.text
            assert figures(response.json()) == figures(earlier), (t0, t1, response.json(), earlier)

        for before in (instants[0] - timedelta(microseconds=1), instants[0] - timedelta(seconds=1)):
            assert_problem(await as_of(before), 404)


# --------------------------------------------------------------------------------------------
# the import


async def test_import_of_10000_csv_rows_lands_in_one_go(stack: Stack) -> None:
    rng = random.Random()
    store_a, store_b = random_store(), random_store()
    async with stack.client() as client:
        existing = [random_sku("OLD") for _ in range(4)]
        for sku in existing:
            await put_stock(client, stack.admin, store_a, sku, 7)
        held = random_sku("HELD")
        await put_stock(client, stack.admin, store_a, held, 10)
        order = (await create_order(client, store_a, [(held, 3)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})

        fresh = [random_sku("IMP") for _ in range(5995)]
        wanted = {(store_a, sku): rng.randint(0, 500) for sku in existing + fresh}
        wanted[(store_a, held)] = 3  # exactly what is held: allowed, nothing left available
        wanted |= {(store_b, sku): rng.randint(0, 500) for sku in fresh[:4000]}  # same skus, other store
        rows = [(store, sku, on_hand) for (store, sku), on_hand in wanted.items()]
        rng.shuffle(rows)
        assert len(rows) == 10_000

        response = await post_import(client, stack, csv_of(rows))
        assert response.status_code == 200, response.text
        assert response.json() == {"rows": 10_000}

        listed = {(store, sku): item for store in (store_a, store_b)
                  for sku, item in (await store_items(client, store)).items()}
        assert set(listed) == set(wanted)
        for key, item in listed.items():
            reserved = 3 if key == (store_a, held) else 0
            version = 3 if key == (store_a, held) else 2 if key[1] in existing else 1
            assert (item["on_hand"], item["reserved"], item["available"], item["version"]) == (
                wanted[key], reserved, wanted[key] - reserved, version), (key, item)

        for store, sku in [(store_a, s) for s in existing + [held]] + rng.sample(sorted(wanted), 15):
            item = await get_item(client, store, sku)
            moves = await ledger(client, store, sku)
            assert_ledger_replays(item, moves)
            last = moves[-1]
            if sku in existing or sku == held:
                old = 7 if sku in existing else 10
                assert (last["kind"], last["on_hand_delta"]) == ("adjusted", wanted[(store, sku)] - old), last
            else:
                assert [(m["kind"], m["on_hand_delta"]) for m in moves] == [("created", wanted[(store, sku)])]

    conn = await stack.stock_db()
    try:  # every one of the 10,000 rows left its movement (read straight from the ledger)
        rows_db = await conn.fetch("""
            SELECT DISTINCT ON (store_id, sku) store_id, sku, kind, on_hand, reserved
            FROM movement WHERE store_id = ANY($1::text[]) ORDER BY store_id, sku, version DESC""",
            [store_a, store_b])
    finally:
        await conn.close()
    last = {(r["store_id"], r["sku"]): r for r in rows_db}
    assert set(last) == set(wanted)
    for key, row in last.items():
        kind = "adjusted" if key[1] in existing or key[1] == held else "created"
        assert (row["kind"], row["on_hand"]) == (kind, wanted[key]), (key, dict(row))
    await stock_invariants(stack)


async def test_a_bad_row_at_line_5000_changes_nothing(stack: Stack) -> None:
    store = random_store()
    async with stack.client() as client:
        existing = [random_sku("OLD") for _ in range(3)]
        for sku in existing:
            await put_stock(client, stack.admin, store, sku, 7)
        await client.post(item_url(store, existing[0]) + "/restock", json={"quantity": 1}, headers=stack.admin)
        fresh = [random_sku("NEW") for _ in range(5998)]
        rows: list[tuple[str, str, Any]] = [(store, sku, 50) for sku in existing] + [(store, sku, 9) for sku in fresh]
        # data rows start at line 2, so row index i sits at line i + 2
        rows[4998] = (store, rows[4998][1], "x")
        before = await snapshot(client, store, existing + fresh[:3] + [rows[4998][1]] + fresh[-3:])
        listed_before = await store_items(client, store)

        response = await post_import(client, stack, csv_of(rows))
        assert_names_line(response, 5000)

        assert await snapshot(client, store, before) == before
        assert await store_items(client, store) == listed_before, "nothing of the file was applied"


@pytest.mark.parametrize(
    ("line4", "line"),
    [
        ("{store},{sku},-1", 4),
        ("{store},{sku},1.5", 4),
        ("{store},{sku},", 4),
        ("{store},bad sku,1", 4),
        ("{store},{sku}", 4),
        ("{store},{sku},1,2", 4),
        ("{store},{sku},ten", 4),
    ],
    ids=["negative", "fraction", "empty", "sku-with-space", "two-fields", "four-fields", "word"],
)
async def test_any_bad_csv_row_rejects_the_file_naming_its_line(stack: Stack, line4: str, line: int) -> None:
    store = random_store()
    async with stack.client() as client:
        old = random_sku("OLD")
        await put_stock(client, stack.admin, store, old, 7)
        new = [random_sku("NEW") for _ in range(4)]
        body = (CSV_HEADER + f"{store},{old},70\n{store},{new[0]},1\n"
                + line4.format(store=store, sku=new[1]) + f"\n{store},{new[2]},3\n{store},{new[3]},4\n")
        before = await snapshot(client, store, [old, *new])
        assert_names_line(await post_import(client, stack, body), line)
        assert await snapshot(client, store, before) == before


async def test_csv_without_its_header_is_rejected_at_line_1(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    async with stack.client() as client:
        response = await post_import(client, stack, f"{store},{sku},5\n{store},{random_sku()},6\n")
        assert_names_line(response, 1)
        assert_problem(await client.get(item_url(store, sku)), 404)


async def test_json_lines_import_counts_lines_from_1(stack: Stack) -> None:
    store = random_store()
    async with stack.client() as client:
        old = random_sku("OLD")
        await put_stock(client, stack.admin, store, old, 7)
        rows = [(store, old, 70)] + [(store, random_sku("NDJ"), n) for n in range(299)]
        response = await post_import(client, stack, ndjson_of(rows), "application/x-ndjson")
        assert response.status_code == 200, response.text
        assert response.json() == {"rows": 300}
        listed = await store_items(client, store)
        assert {sku: i["on_hand"] for sku, i in listed.items()} == {sku: n for _, sku, n in rows}
        assert [m["kind"] for m in await ledger(client, store, old)] == ["created", "adjusted"]
        assert [m["kind"] for m in await ledger(client, store, rows[-1][1])] == ["created"]

        new = [random_sku("NDJ") for _ in range(10)]
        bad_rows: list[tuple[str, str, Any]] = [(store, sku, 5) for sku in new]
        bad_rows[6] = (store, new[6], -3)  # the 7th line
        bad_rows[2] = (store, old, 1)
        before = await snapshot(client, store, [old, *new])
        assert_names_line(await post_import(client, stack, ndjson_of(bad_rows), "application/x-ndjson"), 7)
        assert await snapshot(client, store, before) == before

        not_json = "{store_id: nope}\n" + ndjson_of([(store, sku, 5) for sku in new])
        assert_names_line(await post_import(client, stack, not_json, "application/x-ndjson"), 1)
        assert await snapshot(client, store, before) == before
        assert await store_items(client, store) == listed


async def test_an_import_row_below_the_reserved_units_is_rejected_naming_its_line(stack: Stack) -> None:
    store = random_store()
    async with stack.client() as client:
        held, other = random_sku("HELD"), random_sku("OTHER")
        await put_stock(client, stack.admin, store, held, 10)
        await put_stock(client, stack.admin, store, other, 10)
        order = (await create_order(client, store, [(held, 6)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        new = random_sku("NEW")
        before = await snapshot(client, store, [held, other, new])

        body = csv_of([(store, new, 5), (store, other, 50), (store, held, 5), (store, random_sku(), 1)])
        assert_names_line(await post_import(client, stack, body), 4)
        assert await snapshot(client, store, before) == before
        item = await get_item(client, store, held)
        assert (item["on_hand"], item["reserved"]) == (10, 6)

        response = await post_import(client, stack, csv_of([(store, held, 6)]))  # exactly the held units
        assert response.status_code == 200, response.text
        item = await get_item(client, store, held)
        assert (item["on_hand"], item["reserved"], item["available"], item["version"]) == (
            6, 6, 0, before[held][0]["version"] + 1)


@pytest.mark.parametrize("media", ["text/csv", "application/x-ndjson"])
async def test_a_pair_twice_in_one_file_rejects_it(stack: Stack, media: str) -> None:
    store = random_store()
    async with stack.client() as client:
        old = random_sku("OLD")
        await put_stock(client, stack.admin, store, old, 7)
        new = [random_sku("NEW") for _ in range(4)]
        rows: list[tuple[str, str, Any]] = [(store, new[0], 1), (store, old, 2), (store, new[1], 3),
                                            (random_store(), old, 4), (store, old, 5), (store, new[2], 6)]
        body, repeat_line = (csv_of(rows), 6) if media == "text/csv" else (ndjson_of(rows), 5)
        before = await snapshot(client, store, [old, *new])
        assert_names_line(await post_import(client, stack, body, media), repeat_line)
        assert await snapshot(client, store, before) == before
        assert_problem(await client.get(item_url(rows[3][0], old)), 404)


async def test_reservations_during_an_import_stay_correct(stack: Stack) -> None:
    """Orders keep coming for items the file also counts; the import's count sets on_hand, the
    holds made before, during and after it all stay, and nothing is oversold or lost."""
    rng = random.Random()
    store = random_store()
    hot = [random_sku("HOT") for _ in range(30)]
    placed: list[tuple[str, dict[str, int]]] = []
    async with stack.client() as client:
        await bounded(10, (put_stock(client, stack.admin, store, sku, 400) for sku in hot))

        async def place() -> str:
            lines = {sku: rng.randint(1, 4) for sku in rng.sample(hot, rng.randint(1, 3))}
            response = await create_order(client, store, list(lines.items()), customer="c-import")
            assert response.status_code == 202, response.text
            placed.append((response.json()["order_id"], lines))
            return response.json()["order_id"]

        # holds that exist before the import starts
        early = await bounded(10, (place() for _ in range(10)))
        await bounded(10, (wait_for_status(client, o, {"reserved"}) for o in early))

        rows = [(store, sku, 300) for sku in hot] + [(store, random_sku("BULK"), rng.randint(0, 99))
                                                     for _ in range(3970)]
        rng.shuffle(rows)
        importing = {"done": False}

        async def run_import() -> httpx.Response:
            try:
                return await post_import(client, stack, csv_of(rows))
            finally:
                importing["done"] = True

        async def keep_ordering() -> int:
            count = 0
            while not importing["done"]:
                await bounded(6, (place() for _ in range(6)))
                count += 6
            return count

        response, during = await asyncio.gather(run_import(), keep_ordering())
        assert response.status_code == 200, response.text
        assert response.json() == {"rows": 4000}
        assert during > 0
        await bounded(10, (place() for _ in range(10)))  # and holds after it

        finals = await bounded(30, (wait_for_status(client, o, {"reserved", "rejected"}, timeout=60)
                                    for o, _ in placed))
        assert [o["status"] for o in finals] == ["reserved"] * len(placed), Counter(o["status"] for o in finals)

        held: Counter[str] = Counter()
        for _, lines in placed:
            held.update(lines)
        items = await store_items(client, store)
        assert len(items) == 4000
        for sku in hot:
            item = items[sku]
            assert (item["on_hand"], item["reserved"], item["available"]) == (
                300, held[sku], 300 - held[sku]), (sku, item)
            moves = await ledger(client, store, sku)
            assert_ledger_replays(item, moves)
            counted = [m for m in moves if m["kind"] == "adjusted"]
            assert len(counted) == 1 and counted[0]["on_hand_delta"] == -100, counted
            assert len([m for m in moves if m["kind"] == "reserved"]) == sum(sku in lines for _, lines in placed)
    await stock_invariants(stack)


async def _run_cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "stock-import"), *args, cwd=ROOT,
        env={**os.environ, "STOCK_DATABASE_URL": stack.stock_dsn},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("stock-import did not finish within 60 s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_stock_import_cli_loads_a_file_and_refuses_a_bad_one(stack: Stack, tmp_path: Path) -> None:
    store = random_store()
    async with stack.client() as client:
        old = random_sku("OLD")
        await put_stock(client, stack.admin, store, old, 7)
        new = [random_sku("CLI") for _ in range(3)]
        good = tmp_path / "count.csv"
        good.write_text(csv_of([(store, new[0], 11), (store, old, 70), (store, new[1], 0), (store, new[2], 5)]))
        code, out, err = await _run_cli(stack, str(good))
        assert code == 0, (out, err)
        for sku, on_hand in [(new[0], 11), (old, 70), (new[1], 0), (new[2], 5)]:
            item = await get_item(client, store, sku)
            assert (item["on_hand"], item["reserved"]) == (on_hand, 0), item
            assert_ledger_replays(item, await ledger(client, store, sku))
        assert [m["kind"] for m in await ledger(client, store, old)] == ["created", "adjusted"]
        assert [m["kind"] for m in await ledger(client, store, new[0])] == ["created"]

        lines = tmp_path / "count.jsonl"
        extra = random_sku("CLI")
        lines.write_text(ndjson_of([(store, extra, 4), (store, new[2], 6)]))
        code, out, err = await _run_cli(stack, str(lines))
        assert code == 0, (out, err)
        assert (await get_item(client, store, extra))["on_hand"] == 4
        assert (await get_item(client, store, new[2]))["on_hand"] == 6

        missing = [random_sku("CLI") for _ in range(2)]
        bad = tmp_path / "bad.csv"
        bad.write_text(csv_of([(store, missing[0], 1), (store, old, 2), (store, missing[1], "x")]))
        before = await snapshot(client, store, [old, *missing])
        code, out, err = await _run_cli(stack, str(bad))
        assert code != 0, (out, err)
        assert re.search(r"line\W{0,3}4(?!\d)", out + err, re.IGNORECASE), (out, err)
        assert await snapshot(client, store, before) == before


# --------------------------------------------------------------------------------------------
# the live feed


async def restock(client: httpx.AsyncClient, stack: Stack, store: str, sku: str, quantity: int = 1) -> dict[str, Any]:
    response = await client.post(item_url(store, sku) + "/restock", json={"quantity": quantity}, headers=stack.admin)
    assert response.status_code == 200, response.text
    return response.json()


async def test_feed_through_the_gateway_shows_a_restock_within_a_second(stack: Stack) -> None:
    store, sku = random_store(), random_sku()
    loop = asyncio.get_running_loop()
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, sku, 5)
        async with feed_of(client, store) as feed:
            lags = []
            for quantity in (3, 4):  # the second one with the stream warm
                item = await restock(client, stack, store, sku, quantity)
                committed = loop.time()
                data = stock_event(await feed.next(timeout=10), store)
                lags.append(loop.time() - committed)
                assert (data["sku"], data["kind"], data["version"], data["on_hand"], data["reserved"],
                        data["available"]) == (sku, "restocked", item["version"], item["on_hand"], 0,
                                               item["on_hand"])
            feed.assert_only_stock_events_and_comments()
        assert max(lags) < 1.0, f"the feed took {lags} s to show a restock"


async def test_feed_starts_with_the_next_change_and_ignores_other_stores(stack: Stack) -> None:
    store, other = random_store(), random_store()
    async with stack.client() as client:
        sku, elsewhere = random_sku(), random_sku()
        await put_stock(client, stack.admin, store, sku, 5)
        for _ in range(3):  # history the stream must not replay
            await restock(client, stack, store, sku)
        await put_stock(client, stack.admin, other, elsewhere, 5)
        async with feed_of(client, store) as feed:
            await restock(client, stack, other, elsewhere)
            await put_stock(client, stack.admin, other, random_sku(), 1)
            expected = [await restock(client, stack, store, sku, 2)]
            await restock(client, stack, other, elsewhere)
            created = random_sku()
            expected.append(await put_stock(client, stack.admin, store, created, 8))
            order = (await create_order(client, store, [(sku, 2), (created, 3)])).json()
            await wait_for_status(client, order["order_id"], {"reserved"})
            await restock(client, stack, other, elsewhere)
            expected.append(await restock(client, stack, store, sku, 1))  # the sentinel: the last one

            got = [stock_event(await feed.next(timeout=10), store) for _ in range(5)]
            feed.assert_only_stock_events_and_comments()
        reserved = sorted(brief(d) for d in got if d["kind"] == "reserved")
        assert reserved == sorted([(created, 2, "reserved", 8, 3), (sku, 6, "reserved", 10, 2)]), got
        rest = [brief(d) for d in got if d["kind"] != "reserved"]
        assert rest == [(i["sku"], i["version"], k, i["on_hand"], i["reserved"])
                        for i, k in zip(expected, ["restocked", "created", "restocked"])], got
        assert got[-1]["version"] == expected[-1]["version"] and got[-1]["sku"] == sku, (
            "the sentinel came last: nothing else in between")


async def test_feed_resumes_with_last_event_id_exactly_where_it_left(stack: Stack) -> None:
    store = random_store()
    a, b = random_sku("A"), random_sku("B")
    async with stack.client() as client:
        await put_stock(client, stack.admin, store, a, 10)
        await put_stock(client, stack.admin, store, b, 10)
        async with feed_of(client, store) as feed:
            first = [await restock(client, stack, store, a), await restock(client, stack, store, b),
                     await restock(client, stack, store, a)]
            frames = [await feed.next(timeout=10) for _ in first]
            assert [brief(stock_event(f, store))[:2] for f in frames] == [(i["sku"], i["version"]) for i in first]
            feed.assert_only_stock_events_and_comments()
        last_id = frames[-1]["id"]
        seen_ids = {f["id"] for f in frames}

        missed: list[tuple[str, int, str]] = []
        item = await restock(client, stack, store, b, 5)
        missed.append((b, item["version"], "restocked"))
        response = await client.put(item_url(store, a), json={"on_hand": 20, "expected_version": 3},
                                    headers=stack.admin)
        assert response.status_code == 200, response.text
        missed.append((a, 4, "adjusted"))
        c = random_sku("C")
        await put_stock(client, stack.admin, store, c, 3)
        missed.append((c, 1, "created"))
        order = (await create_order(client, store, [(b, 2)])).json()
        await wait_for_status(client, order["order_id"], {"reserved"})
        missed.append((b, 4, "reserved"))
        assert (await client.post(f"/orders/{order['order_id']}/cancel")).status_code == 202

        async def released() -> None:
            assert (await get_item(client, store, b))["version"] == 5
        await eventually(released, timeout=30)
        missed.append((b, 5, "released"))

        async with feed_of(client, store, last_event_id=last_id) as feed:
            resumed = [await feed.next(timeout=10) for _ in missed]
            sentinel = await restock(client, stack, store, c)
            after = stock_event(await feed.next(timeout=10), store)
            feed.assert_only_stock_events_and_comments()
        assert [brief(stock_event(f, store))[:3] for f in resumed] == missed
        ids = [f["id"] for f in resumed]
        assert len(set(ids)) == len(ids) and not set(ids) & seen_ids, "no event twice"
        assert (after["sku"], after["version"]) == (c, sentinel["version"]), "nothing more was missed or repeated"


async def test_feed_brings_every_change_once_under_concurrent_writes(stack: Stack) -> None:
    """While an import, orders and restocks change one store at once, a connected client gets
    each of the store's changes exactly once, and each item's in version order."""
    rng = random.Random()
    store = random_store()
    hot = [random_sku("HOT") for _ in range(10)]  # in the file and ordered
    cold = [random_sku("COLD") for _ in range(10)]  # not in the file, ordered and restocked
    async with stack.client() as client:
        await bounded(10, (put_stock(client, stack.admin, store, sku, 500) for sku in hot + cold))
        before = {sku: 1 for sku in hot + cold}
        rows = [(store, sku, 400) for sku in hot] + [(store, random_sku("BULK"), 1) for _ in range(2990)]
        rng.shuffle(rows)
        placed: list[str] = []

        async def place() -> None:
            lines = [(sku, rng.randint(1, 3)) for sku in rng.sample(hot + cold, rng.randint(1, 3))]
            response = await create_order(client, store, lines, customer="c-feed")
            assert response.status_code == 202, response.text
            placed.append(response.json()["order_id"])

        importing = {"done": False}

        async def run_import() -> httpx.Response:
            try:
                return await post_import(client, stack, csv_of(rows))
            finally:
                importing["done"] = True

        async def keep_writing() -> None:
            while not importing["done"]:
                await bounded(8, [place(), place(), place(), place(),
                                  *(restock(client, stack, store, rng.choice(cold)) for _ in range(4))])

        async with feed_of(client, store) as feed:
            await bounded(8, [place() for _ in range(8)] + [restock(client, stack, store, s) for s in cold[:8]])
            response, _ = await asyncio.gather(run_import(), keep_writing())
            assert response.status_code == 200, response.text
            await bounded(8, [place() for _ in range(8)] + [restock(client, stack, store, s) for s in cold[:8]])
            await bounded(20, (wait_for_status(client, o, {"reserved", "rejected"}, timeout=60) for o in placed))

            items = await store_items(client, store)
            expected = {(sku, v) for sku, item in items.items()
                        for v in range(before.get(sku, 0) + 1, item["version"] + 1)}
            got: list[tuple[Any, ...]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not expected <= {g[:2] for g in got} and loop.time() < deadline:
                try:
                    frame = await feed.next(timeout=min(10.0, max(0.1, deadline - loop.time())))
                except AssertionError:
                    break
                got.append(brief(stock_event(frame, store)))
            keys = [g[:2] for g in got]
            missing = expected - set(keys)
            assert not missing, (f"{len(missing)} of {len(expected)} changes never came through the feed, "
                                 f"e.g. {sorted(missing)[:5]} (received {len(got)})")
            assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1][:5]
            assert set(keys) == expected, sorted(set(keys) - expected)[:5]
            sentinel = await restock(client, stack, store, cold[0])
            after = stock_event(await feed.next(timeout=10), store)
            assert (after["sku"], after["version"]) == (cold[0], sentinel["version"])
            feed.assert_only_stock_events_and_comments()

        by_sku: dict[str, list[int]] = defaultdict(list)
        for sku, version, *_ in got:
            by_sku[sku].append(version)
        assert all(v == sorted(v) for v in by_sku.values()), "an item's changes came out of version order"
        for sku in hot + cold[:3]:  # each event carries its change's kind and the figures after it
            after_change, on_hand, reserved = {}, 0, 0
            for m in await ledger(client, store, sku):
                on_hand, reserved = on_hand + m["on_hand_delta"], reserved + m["reserved_delta"]
                after_change[m["version"]] = (m["kind"], on_hand, reserved)
            for g in got:
                if g[0] == sku:
                    assert after_change[g[1]] == g[2:], (g, after_change[g[1]])
