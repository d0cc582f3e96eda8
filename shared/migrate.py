"""`inventory-migrate [orders|stock ...]`: applies each service's migrations to its database."""

import argparse
import asyncio

from shared.db import migrate
from shared.settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("services", nargs="*", default=["orders", "stock"])
    args = parser.parse_args()
    settings = get_settings()
    dsns = {"orders": settings.orders_database_url, "stock": settings.stock_database_url}
    for service in args.services:
        applied = asyncio.run(migrate(dsns[service], service))
        print(f"{service}: {len(applied)} migration(s) applied")


if __name__ == "__main__":
    main()
