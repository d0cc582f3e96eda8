"""`inventory-migrate [orders|stock ...]`: applies each service's migrations to its database."""

import argparse
import asyncio

import orders
import stock
from shared.db import migrate
from shared.settings import get_settings

MIGRATIONS = {"orders": orders.MIGRATIONS, "stock": stock.MIGRATIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("services", nargs="*", default=["orders", "stock"])
    args = parser.parse_args()
    settings = get_settings()
    dsns = {"orders": settings.orders_database_url, "stock": settings.stock_database_url}
    for service in args.services:
        applied = asyncio.run(migrate(dsns[service], MIGRATIONS[service]))
        print(f"{service}: {len(applied)} migration(s) applied")


if __name__ == "__main__":
    main()
