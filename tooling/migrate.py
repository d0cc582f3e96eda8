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
    from tooling.devenv import _is_local, local_servers  # devenv imports this module

    pg, _ = local_servers(settings)
    if pg is not None:  # the local server: migrations run as each database's migrator
        dsns = {name: pg.migrator_dsn(dsn) if _is_local(dsn) else dsn for name, dsn in dsns.items()}
    for service in args.services:
        applied = asyncio.run(migrate(dsns[service], MIGRATIONS[service]))
        print(f"{service}: {len(applied)} migration(s) applied")


if __name__ == "__main__":
    main()
