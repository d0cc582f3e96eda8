"""`stock-import FILE`: the bulk import of POST /stock/import, straight into the database.

FILE is CSV with the header `store_id,sku,on_hand` (`.csv`) or JSON lines (any other name);
`-` reads standard input as CSV unless --ndjson is given."""

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from shared.settings import get_settings
from stock.imports import BadRow, import_rows, parse_csv, parse_ndjson


async def _chunks(path: str) -> AsyncIterator[bytes]:
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115, ASYNC230 - a CLI: nothing else runs on this loop
    try:
        while chunk := stream.read(1 << 16):
            yield chunk
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


async def _run(path: str, ndjson: bool) -> int:
    conn = await asyncpg.connect(get_settings().stock_database_url)
    parse = parse_ndjson if ndjson else parse_csv
    try:
        async with conn.transaction():
            result = await import_rows(conn, parse(_chunks(path)), None)
    except BadRow as exc:
        print(f"rejected, nothing imported: {exc}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    print(f"imported {result.rows} rows ({result.created} created, {result.adjusted} adjusted)")
    return 0


def import_main() -> None:
    parser = argparse.ArgumentParser(prog="stock-import", description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--ndjson", action="store_true", help="the file is JSON lines")
    args = parser.parse_args()
    ndjson = args.ndjson or (args.file != "-" and Path(args.file).suffix.lower() != ".csv")
    sys.exit(asyncio.run(_run(args.file, ndjson)))
