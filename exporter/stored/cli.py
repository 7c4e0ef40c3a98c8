"""`exporter exports`: the stored exports, newest first, then the bytes each kind holds
against the quota; `exporter exports delete ID`."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.clikit import fail, print_table, start, when, with_engine
from exporter.stored.storages import storage_for
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
    query = sa.select(t.c.id, t.c.kind, t.c.owner, t.c.principal, t.c.status, t.c.dataset,
                      t.c.rows, t.c.bytes, t.c.created, t.c.expires).order_by(
                          t.c.created.desc()).limit(limit)
    # What the storage holds (running and complete), by kind: what counts against the quota.
    held = (sa.select(t.c.kind, sa.func.count(), sa.func.coalesce(sa.func.sum(t.c.bytes), 0))
            .where(t.c.status.in_(("running", "complete"))).group_by(t.c.kind))

    async def read(engine: AsyncEngine) -> tuple[list[Any], dict[str, tuple[int, int]]]:
        async with engine.connect() as conn:
            rows = list((await conn.execute(query)).all())
            kinds = {str(k): (int(n), int(b)) for k, n, b in await conn.execute(held)}
            return rows, kinds

    rows, kinds = with_engine(settings, "exports", read)
    print_table(
        ["id", "kind", "owner", "principal", "status", "dataset", "rows", "bytes", "created",
         "expires"],
        [[r.id, "copy" if r.kind == "streamed" else r.kind, r.owner, r.principal, r.status,
          r.dataset, r.rows, r.bytes, when(r.created), when(r.expires) if r.expires else "-"]
         for r in rows],
    )
    cap = settings.exports_max_bytes
    print()
    for kind, label, share in (("async", "stored exports", settings.exports_quota_per_principal),
                               ("streamed", "resume copies", settings.exports_resume_share)):
        count, size = kinds.get(kind, (0, 0))
        limit_text = (f" (share: {int(cap * share):,} bytes"
                      f"{' per principal' if kind == 'async' else ''})") if cap else ""
        print(f"{label}: {count} holding {size:,} bytes{limit_text}")
    total = sum(size for _, size in kinds.values())
    print(f"quota: {total:,} of {cap:,} bytes used" if cap else f"no quota: {total:,} bytes")


@exports.command("delete", help="remove a stored export and its file (a running one is"
                 " cancelled)")
def delete(export_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    settings = start()
    storage = storage_for(settings)

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
