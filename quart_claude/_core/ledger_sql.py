"""The budgets' counts and the usage ledger in the app's database (``CLAUDE_DATABASE_URL``):
the same :class:`~.ledger.LedgerStore` as memory and Redis, each operation one transaction.

A reservation locks the identity's period rows (``SELECT ... FOR UPDATE`` on PostgreSQL; on
SQLite the write lock taken at ``BEGIN``), sweeps the expired holds, and inserts its hold only
if what is used and held leaves room: concurrent requests on any worker or host wait for each
other and never reserve past a limit together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .budget import Amount, Limit, Refusal
from .ledger import DAY_SECONDS, LedgerEntry, Window, day_view, windows
from .tables import budget_holds, budget_windows, usage_days, usage_ledger

if TYPE_CHECKING:
    from .budget import Spend
    from .db import _Runner

__all__ = ["SqlLedger"]

_w, _h, _d = budget_windows.c, budget_holds.c, usage_days.c
_LOCK = (
    select(_w.used_tokens, _w.used_micro_usd)
    .where(_w.identity == bindparam("b_identity"), _w.window == bindparam("b_window"))
    .with_for_update()
)
_SWEEP = delete(budget_holds).where(
    _h.identity == bindparam("b_identity"),
    _h.window == bindparam("b_window"),
    _h.expires_at < bindparam("b_now"),
)
_HELD = select(  # every hold but the one being taken or topped up
    func.coalesce(func.sum(_h.tokens), 0), func.coalesce(func.sum(_h.micro_usd), 0)
).where(
    _h.identity == bindparam("b_identity"),
    _h.window == bindparam("b_window"),
    _h.id != bindparam("b_hold"),
)
_UNHOLD = delete(budget_holds).where(_h.id == bindparam("b_hold"))
_SPEND = (
    update(budget_windows)
    .where(_w.identity == bindparam("b_identity"), _w.window == bindparam("b_window"))
    .values(
        used_tokens=_w.used_tokens + bindparam("b_tokens"),
        used_micro_usd=_w.used_micro_usd + bindparam("b_micro"),
    )
)
_DAY_ADD = (
    update(usage_days)
    .where(_d.identity == bindparam("b_identity"), _d.day == bindparam("b_day"))
    .values(
        tokens=_d.tokens + bindparam("b_tokens"),
        micro_usd=_d.micro_usd + bindparam("b_micro"),
        requests=_d.requests + 1,
    )
)


def _insert_missing(conn: Connection, table: Any, row: dict[str, Any]) -> None:
    """Insert ``row`` unless its key is there (the dialect's own ON CONFLICT DO NOTHING)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).values(row).on_conflict_do_nothing())


def _reserve(
    conn: Connection,
    identity: str,
    open_windows: Sequence[Window],
    hold: str,
    ask: Amount,
    floor: Amount,
    expires_ms: int,
    now_ms: int,
) -> Amount | Refusal:
    granted = ask
    for window in open_windows:
        key = {"b_identity": identity, "b_window": window.name}
        _insert_missing(
            conn,
            budget_windows,
            {"identity": identity, "window": window.name, "used_tokens": 0, "used_micro_usd": 0}
            | {"expires_at": (window.end + DAY_SECONDS) * 1000},
        )
        used = Amount(*(int(n) for n in conn.execute(_LOCK, key).one()))
        conn.execute(_SWEEP, {**key, "b_now": now_ms})
        held = Amount(*(int(n) for n in conn.execute(_HELD, {**key, "b_hold": hold}).one()))
        fitted = window.fit(used, held, granted, floor)
        if fitted is None:
            return Refusal(window.limit, used, window.end)
        granted = fitted
    conn.execute(_UNHOLD, {"b_hold": hold})  # a top-up replaces the hold it grows
    conn.execute(
        budget_holds.insert(),
        [
            {
                "id": hold,
                "identity": identity,
                "window": window.name,
                "tokens": granted.tokens,
                "micro_usd": granted.micro_usd,
                "expires_at": expires_ms,
            }
            for window in open_windows
        ],
    )
    return granted


def _settle(
    conn: Connection, identity: str, open_windows: Sequence[Window], hold: str, spent: Amount
) -> None:
    conn.execute(_UNHOLD, {"b_hold": hold})
    for window in open_windows:
        params = {"b_identity": identity, "b_window": window.name}
        conn.execute(_SPEND, {**params, "b_tokens": spent.tokens, "b_micro": spent.micro_usd})


def _record(conn: Connection, entry: LedgerEntry, spent: Amount) -> None:
    row = asdict(entry)
    row["at"] = int(entry.at * 1000)
    conn.execute(usage_ledger.insert(), row)
    day = int(entry.at) // DAY_SECONDS
    _insert_missing(
        conn,
        usage_days,
        {"identity": entry.identity, "day": day, "tokens": 0, "micro_usd": 0, "requests": 0},
    )
    conn.execute(
        _DAY_ADD,
        {
            "b_identity": entry.identity,
            "b_day": day,
            "b_tokens": spent.tokens,
            "b_micro": spent.micro_usd,
        },
    )


def _used(conn: Connection, identity: str, names: Sequence[str]) -> list[Amount]:
    query = select(_w.window, _w.used_tokens, _w.used_micro_usd).where(
        _w.identity == identity, _w.window.in_(names)
    )
    found = {
        row.window: Amount(int(row.used_tokens), int(row.used_micro_usd))
        for row in conn.execute(query)
    }
    return [found.get(name, Amount()) for name in names]


def _days(conn: Connection, identity: str, first: int, last: int) -> dict[int, Any]:
    query = select(usage_days).where(_d.identity == identity, _d.day >= first, _d.day <= last)
    return {row.day: row for row in conn.execute(query)}


def _entries(conn: Connection, identity: str) -> list[LedgerEntry]:
    query = (
        select(usage_ledger).where(usage_ledger.c.identity == identity).order_by(usage_ledger.c.id)
    )
    out = []
    for row in conn.execute(query):
        values = dict(row._mapping)
        values.pop("id")
        values["at"] = values["at"] / 1000
        out.append(LedgerEntry(**values))
    return out


class SqlLedger:
    """Budgets and the ledger in the conversations' database, through its runner."""

    def __init__(self, runner: _Runner) -> None:
        self.runner = runner

    async def reserve(
        self,
        identity: str,
        limits: Sequence[Limit],
        hold: str,
        *,
        ask: Amount,
        floor: Amount,
        ttl: float,
        now: float,
    ) -> Amount | Refusal:
        open_windows = windows(limits, now)
        expires, stamp = int((now + ttl) * 1000), int(now * 1000)
        return await self.runner.write(
            _reserve, identity, open_windows, hold, ask, floor, expires, stamp
        )

    async def settle(
        self, identity: str, limits: Sequence[Limit], hold: str, spent: Amount, now: float
    ) -> None:
        await self.runner.write(_settle, identity, windows(limits, now), hold, spent)

    async def record(self, spend: Spend, usage: dict[str, Any], spent: Amount) -> None:
        await self.runner.write(_record, LedgerEntry.of(spend, usage, spent), spent)

    async def used(self, identity: str, limits: Sequence[Limit], now: float) -> list[Amount]:
        names = [f"{limit.period.name}:{limit.period.window(now)[0]}" for limit in limits]
        return await self.runner.read(_used, identity, names)

    async def days(self, identity: str, count: int, now: float) -> list[dict[str, Any]]:
        today = int(now) // DAY_SECONDS
        rows = await self.runner.read(_days, identity, today - count + 1, today)
        out = []
        for day in range(today - count + 1, today + 1):
            row = rows.get(day)
            out.append(
                day_view(day, *(row.tokens, row.micro_usd, row.requests) if row else (0, 0, 0))
            )
        return out

    async def entries(self, identity: str) -> list[LedgerEntry]:
        return await self.runner.read(_entries, identity)
