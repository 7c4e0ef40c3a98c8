"""`exporter exports`: the stored exports, newest first; `exporter exports delete ID`."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.clikit import fail, print_table, start, when, with_engine
from exporter.stored.storage import LocalStorage
from exporter.tables import stored_exports as t

exports = typer.Typer(help="stored exports (POST /exports): list, delete",
                      invoke_without_command=True, no_args_is_help=False)


@exports.callback()
def listing(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", metavar="N")] = 50,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    settings = start()
    query = sa.select(t.c.id, t.c.owner, t.c.principal, t.c.status, t.c.dataset, t.c.rows,
                      t.c.bytes, t.c.created, t.c.expires).order_by(
                          t.c.created.desc()).limit(limit)

    async def read(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as conn:
            return list((await conn.execute(query)).all())

    rows = with_engine(settings, "exports", read)
    print_table(
        ["id", "owner", "principal", "status", "dataset", "rows", "bytes", "created",
         "expires"],
        [[r.id, r.owner, r.principal, r.status, r.dataset, r.rows, r.bytes, when(r.created),
          when(r.expires) if r.expires else "-"] for r in rows],
    )


@exports.command("delete", help="remove a stored export and its file (a running one is"
                 " cancelled)")
def delete(export_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    settings = start()
    storage = LocalStorage(settings.exports_folder)

    async def remove(engine: AsyncEngine) -> str | None:
        async with engine.begin() as conn:
            row = (await conn.execute(sa.select(t.c.status, t.c.storage_key)
                                      .where(t.c.id == export_id))).first()
            if row is None:
                return None
            if row.status == "running":
                # Its runner, on whatever host, stops at its next beat and removes its file.
                await conn.execute(sa.update(t).where(t.c.id == export_id).values(
                    status="cancelled", error="cancelled from the command line",
                    finished=sa.func.now(), expires=sa.func.now()))
                return "cancelled"
            await conn.execute(sa.delete(t).where(t.c.id == export_id))
        await storage.delete(row.storage_key)
        return "deleted"

    done = with_engine(settings, "exports delete", remove)
    if done is None:
        fail(f"exporter exports delete: no export {export_id!r}")
    print(f"{export_id}: {done}")


def register(app: typer.Typer) -> None:
    app.add_typer(exports, name="exports")
