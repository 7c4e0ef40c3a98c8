"""The naive way to an XLSX of the demo table: asyncpg rows into xlsxwriter's
constant-memory mode, as a user would write it (bench/xlsx.py times it).

    python -m bench.xlsx_naive DATABASE_URL OUT.xlsx

Prints its own peak RSS in bytes, last.
"""

from __future__ import annotations

import asyncio
import resource
import sys
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import xlsxwriter

from exporter.db import libpq_url

# What xlsxwriter writes as it is; anything else (uuid, lists, json) as its text.
PLAIN = (str, int, float, bool, Decimal, datetime, date)


def cell(value: Any) -> Any:
    return value if value is None or isinstance(value, PLAIN) else str(value)


async def export(url: str, out: str) -> None:
    book = xlsxwriter.Workbook(out, {"constant_memory": True, "remove_timezone": True})
    sheet = book.add_worksheet("orders")
    dates = book.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
    conn = await asyncpg.connect(libpq_url(url), server_settings={"timezone": "UTC"})
    try:
        async with conn.transaction():
            cursor = conn.cursor("SELECT * FROM exports.orders")
            n = 0
            async for record in cursor:
                if n == 0:
                    sheet.write_row(0, 0, list(record.keys()))
                n += 1
                for i, value in enumerate(record.values()):
                    value = cell(value)
                    if isinstance(value, datetime | date):
                        sheet.write_datetime(n, i, value, dates)
                    else:
                        sheet.write(n, i, value)
    finally:
        await conn.close()
    book.close()


def main(argv: list[str]) -> None:
    asyncio.run(export(argv[0], argv[1]))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


if __name__ == "__main__":
    main(sys.argv[1:])
