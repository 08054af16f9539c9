"""The tables conversations live in, and the SQL that reads and writes them (SQLAlchemy Core,
asyncio): one write when a turn opens, one when it ends, none per event.

The tables are ours, in our own ``MetaData`` with a ``claude_`` prefix, never the host's
model base; the host's Alembic autogenerate leaves them alone with :func:`include_object`.
A message row is one turn of one side: a user's content as the API takes it, or the
assistant's turn as every API message it produced (a tool loop is several), kept exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    bindparam,
    event,
    select,
    text,
    update,
)
from sqlalchemy import create_engine as sync_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from .tables import VERSION_TABLE, conversations, messages, metadata
from .turns import TurnRef

__all__ = [
    "Busy",
    "Conversations",
    "Existing",
    "MessageRow",
    "NoSuchConversation",
    "Opened",
    "branch_to",
    "TurnRef",
    "VERSION_TABLE",
    "include_object",
    "metadata",
]

T = TypeVar("T")


_TABLES = frozenset({*metadata.tables, VERSION_TABLE})


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """For the host's Alembic ``env.py`` (``context.configure(include_object=...)``): leave
    quart-claude's tables out of its autogenerate, so it never tries to drop them."""
    table = getattr(obj, "table", None)
    owner = table.name if table is not None else name
    return owner not in _TABLES


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return secrets.token_hex(12)


class NoSuchConversation(Exception):
    """Missing, or another identity's: the same 404 either way."""


class Busy(Exception):
    """The conversation's turn is still streaming."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(stream_id)
        self.stream_id = stream_id


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    parent_id: str | None
    role: str
    content: Any
    status: str
    stream_id: str | None
    model: str | None
    stop_reason: str | None
    usage: dict[str, Any] | None
    created_at: int
    client_message_id: str | None = None

    @classmethod
    def of(cls, row: Any) -> MessageRow:
        return cls(
            row.id,
            row.parent_id,
            row.role,
            row.content,
            row.status,
            row.stream_id,
            row.model,
            row.stop_reason,
            row.usage,
            row.created_at,
            row.client_message_id,
        )


@dataclass(frozen=True, slots=True)
class Opened:
    """A turn just opened: where it is stored, and the branch it continues (root first, the
    new user message last)."""

    ref: TurnRef
    branch: list[MessageRow]
    created: bool  # a new conversation
    previous_leaf: str | None = None  # the conversation's leaf before the turn
    regenerate: bool = False  # the user message was there before


@dataclass(frozen=True, slots=True)
class Existing:
    """A retried send (the same ``client_message_id``): the turn it made the first time."""

    ref: TurnRef
    answer: MessageRow


@dataclass(slots=True)
class Send:
    """What a send asks for (validated by the route)."""

    owner: str
    conversation_id: str | None
    content: Any  # the new user turn's content; None with regenerate
    stream_id: str
    model: str
    parent_id: str | None = None
    parent_given: bool = False  # parent_id was in the body (null: the conversation's root)
    regenerate: bool = False
    client_message_id: str | None = None
    create: bool = False  # a conversation_id that does not exist yet is created
    extra: dict[str, Any] = field(default_factory=dict)


def create_engine(url: str) -> AsyncEngine | Engine:
    """Our own engine for ``CLAUDE_DATABASE_URL``: for PostgreSQL an ``AsyncEngine`` whose
    connections are checked before use (a restarted server's are gone); for SQLite a sync
    engine (its transactions run in a thread, see :class:`_ThreadRunner`) with a busy
    timeout, foreign keys, deleted content overwritten, and write transactions that take the
    lock at BEGIN (two sends to one conversation wait for each other instead of failing)."""
    if url.startswith("sqlite"):
        engine = sync_engine(
            url.replace("sqlite+aiosqlite:", "sqlite:", 1),
            connect_args={"timeout": 15, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_connect(connection: Any, record: Any) -> None:
    connection.isolation_level = None  # SQLAlchemy's recipe: BEGIN is ours (_sqlite_begin)
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA secure_delete=ON")  # DELETE leaves nothing readable in the file
    # a commit appends to the write-ahead log instead of rewriting pages and a journal
    # (a fifth of the CPU per turn); a delete truncates the log (see Conversations.delete)
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _loop_engine(engine: Engine) -> Engine | None:
    """Our SQLite's connection for writes on the loop thread (see :class:`_ThreadRunner`):
    one connection that never waits for the lock and never checkpoints."""
    if engine.dialect.name != "sqlite":
        return None
    loop = sync_engine(
        engine.url,
        connect_args={"timeout": 0, "check_same_thread": False},
        poolclass=StaticPool,
    )
    event.listen(loop, "connect", _sqlite_connect)
    event.listen(loop, "connect", _no_checkpoints)
    event.listen(loop, "begin", _sqlite_begin)
    return loop


def _no_checkpoints(connection: Any, record: Any) -> None:
    connection.execute("PRAGMA wal_autocheckpoint=0")  # the thread's connections do them


class Conversations:
    """The conversations of one app: every query its routes and producers make, each a
    transaction written once as plain (sync) SQLAlchemy Core and run by the engine's
    :class:`_Runner`."""

    def __init__(self, engine: AsyncEngine | Engine, *, owned: bool) -> None:
        self.runner: _Runner = (
            _AsyncRunner(engine)
            if isinstance(engine, AsyncEngine)
            else _ThreadRunner(engine, _loop_engine(engine) if owned else None)
        )
        self.owned: bool = owned  # ours to dispose of (not the host's)
        self.sqlite: bool = engine.dialect.name == "sqlite"

    async def create_tables(self) -> None:
        """SQLite in development: the tables without a migration step."""
        await self.runner.write(lambda conn: metadata.create_all(conn))

    async def migrated(self) -> bool:
        """Whether our tables exist (``python -m quart_claude db upgrade`` made them)."""
        names = await self.runner.read(lambda conn: set(conn.dialect.get_table_names(conn)))
        return set(metadata.tables) <= names

    async def ping(self) -> bool:
        """Whether the database answers within 3 s (``/ready``)."""
        try:
            async with asyncio.timeout(3):
                await self.runner.read(lambda conn: conn.execute(text("SELECT 1")).all())
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.runner.close(dispose=self.owned)

    # -- a turn ---------------------------------------------------------------------------

    async def open_turn(self, send: Send) -> Opened | Existing:
        """Store the new user message and the assistant's placeholder, and mark the
        conversation busy, in one transaction. Raises :class:`Busy` or
        :class:`NoSuchConversation`."""
        return await self.runner.write(_open_turn, send)

    async def claim(self, ref: TurnRef) -> TurnRef | None:
        """A takeover: this producer's fence, above the one before (whose commit can no longer
        land); None when the turn is no longer streaming."""
        return await self.runner.write(_claim_turn, ref)

    async def finish(
        self,
        ref: TurnRef,
        stream_id: str,
        *,
        content: dict[str, Any],
        status: str,
        stop_reason: str | None,
        usage: dict[str, Any],
    ) -> bool:
        """Store the answer, once: False when the turn was fenced out or already stored."""
        values = {"content": content, "status": status, "stop_reason": stop_reason, "usage": usage}
        return await self.runner.write(_finish, ref, stream_id, values)

    async def retract(self, opened: Opened, stream_id: str) -> None:
        """Take back a turn that never started (its budget refused it): its rows go, the
        conversation's leaf is what it was, and a conversation made for it goes too."""
        await self.runner.write(_retract, opened, stream_id)

    async def abandon(self, conversation_id: str, stream_id: str) -> None:
        """A turn whose producer is gone for good (no store knows its stream): kept as an
        error, and the conversation free again."""
        await self.runner.write(_abandon, conversation_id, stream_id)

    # -- reading and managing -------------------------------------------------------------

    async def page(self, owner: str, before: tuple[int, str] | None, limit: int) -> list[Any]:
        """The identity's conversations, newest first, after the keyset ``before``."""
        return await self.runner.read(_page, owner, before, limit)

    async def load(self, owner: str, cid: str) -> tuple[Any, list[MessageRow]]:
        """A conversation and all its messages (every branch), oldest first."""
        return await self.runner.read(lambda conn: (_head(conn, owner, cid), _rows(conn, cid)))

    async def rename(self, owner: str, cid: str, title: str | None) -> None:
        await self.runner.write(_set, owner, cid, {"title": title})

    async def switch(self, owner: str, cid: str, leaf_id: str) -> None:
        await self.runner.write(_set, owner, cid, {"leaf_id": leaf_id})

    async def delete(self, owner: str, cid: str) -> str | None:
        """Erase a conversation and every message of it; the stream still running, if any.
        SQLite: then the write-ahead log is copied into the file (whose freed pages
        secure_delete has zeroed) and emptied, so a deleted message is in neither."""
        active = await self.runner.write(_delete, owner, cid)
        if self.sqlite:
            await self.runner.raw("PRAGMA wal_checkpoint(TRUNCATE)")
        return active

    async def purge(self, older_than_ms: int) -> int:
        """Erase conversations untouched since ``older_than_ms`` (``CLAUDE_CONVERSATION_TTL``)."""
        return await self.runner.write(_purge, older_than_ms)


class _Runner(Protocol):
    """How a transaction (a function of a sync ``Connection``) runs for one engine."""

    async def write(self, work: Callable[..., T], *args: Any) -> T: ...

    async def read(self, work: Callable[..., T], *args: Any) -> T: ...

    async def raw(self, sql: str) -> None: ...

    async def close(self, *, dispose: bool) -> None: ...


class _AsyncRunner:
    """An ``AsyncEngine`` (PostgreSQL, or the host's own): the transaction in SQLAlchemy's
    ``run_sync``, each statement awaited on the loop."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine: AsyncEngine = engine

    async def write(self, work: Callable[..., T], *args: Any) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(work, *args)

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        async with self.engine.connect() as conn:
            return await conn.run_sync(work, *args)

    async def raw(self, sql: str) -> None:
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.execute(sql)

    async def close(self, *, dispose: bool) -> None:
        if dispose:
            await self.engine.dispose()


class _ThreadRunner:
    """A sync engine (our own SQLite, or a host's): each transaction run whole in a worker
    thread, one hand-off per transaction (the async driver makes several per statement).

    Our own SQLite writes on the loop thread first (``loop_engine``): a turn's transaction
    is about 0.2 ms of CPU and, in WAL mode with ``synchronous=NORMAL``, no fsync, while a
    hand-off to a thread costs more than the transaction (155 µs of CPU a hop on a 2-core
    machine; the GIL is held for the work wherever it runs). The loop never waits: its
    connection's busy timeout is 0, so a lock held by another worker sends the transaction
    (rolled back whole) to a thread that waits up to 15 s; and it never checkpoints, the
    only fsync: every ``_CHECKPOINT_EVERY`` commits a thread does."""

    def __init__(self, engine: Engine, loop_engine: Engine | None = None) -> None:
        self.engine: Engine = engine
        self.loop_engine: Engine | None = loop_engine
        self.pool: ThreadPoolExecutor = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="quart-claude-db"
        )
        self._commits = 0
        self._checkpoint: asyncio.Future[None] | None = None

    async def write(self, work: Callable[..., T], *args: Any) -> T:
        if self.loop_engine is not None:
            try:
                with self.loop_engine.begin() as conn:
                    result = work(conn, *args)
            except OperationalError as exc:
                if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
                    raise
            else:
                self._committed()
                return result
        return await self._run(self._write, work, args)

    def _committed(self) -> None:
        self._commits += 1
        if self._commits % _CHECKPOINT_EVERY == 0 and (
            self._checkpoint is None or self._checkpoint.done()
        ):
            self._checkpoint = asyncio.ensure_future(self.raw("PRAGMA wal_checkpoint(PASSIVE)"))

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        return await self._run(self._read, work, args)

    async def raw(self, sql: str) -> None:
        await self._run(self._raw, sql)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _write(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.engine.begin() as conn:
            return work(conn, *args)

    def _read(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.engine.connect() as conn:
            return work(conn, *args)

    def _raw(self, sql: str) -> None:
        connection = self.engine.raw_connection()
        try:
            connection.driver_connection.execute(sql)  # type: ignore[union-attr]
        finally:
            connection.close()

    async def close(self, *, dispose: bool) -> None:
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        if self.loop_engine is not None:
            self.loop_engine.dispose()
        await self._run(self.engine.dispose)
        self.pool.shutdown(wait=False)


#: loop commits between two checkpoints of the write-ahead log (in a thread)
_CHECKPOINT_EVERY = 200


# -- the transactions (plain SQLAlchemy Core on a sync Connection) ---------------------------
#
# A turn's statements are built once, here, with bound parameters: building a statement per
# call costs five times what running it does (180 vs 33 µs on SQLite).

_m, _c = messages.c, conversations.c
_INSERT_MESSAGES = messages.insert()
_INSERT_CONVERSATION = conversations.insert()
_HEAD = select(conversations).where(_c.id == bindparam("b_cid"), _c.owner == bindparam("b_owner"))
_CLAIM = (
    update(conversations)
    .where(_c.id == bindparam("b_cid"), _c.owner == bindparam("b_owner"))
    .where(_c.active_stream_id.is_(None))
    .values(active_stream_id=bindparam("b_stream"))
)
_RELEASE = (
    update(conversations)
    .where(_c.id == bindparam("b_cid"), _c.active_stream_id == bindparam("b_stream"))
    .values(active_stream_id=None, updated_at=bindparam("b_stamp"))
)
_NEW_LEAF = (
    update(conversations)
    .where(_c.id == bindparam("b_cid"))
    .values(leaf_id=bindparam("b_leaf"), updated_at=bindparam("b_stamp"))
)
#: the values come with the parameters (content, status, stop_reason, usage)
_FINISH = update(messages).where(
    _m.id == bindparam("b_id"), _m.status == "streaming", _m.fence == bindparam("b_fence")
)
#: a conversation's tree without its content: enough to find a branch
_TREE = select(_m.id, _m.parent_id, _m.role).where(_m.conversation_id == bindparam("b_cid"))
_BY_IDS = select(messages).where(_m.id.in_(bindparam("b_ids", expanding=True)))
_ALL = (
    select(messages).where(_m.conversation_id == bindparam("b_cid")).order_by(_m.created_at, _m.id)
)


def _open_turn(conn: Connection, send: Send) -> Opened | Existing:
    user_id, answer_id = new_id(), new_id()
    if send.client_message_id is not None:
        existing = _existing(conn, send)
        if existing is not None:
            return existing
    cid, leaf, created = _conversation(conn, send, answer_id)
    branch = [] if created else _branch(conn, cid, leaf, send)
    stamp = now_ms()
    if send.regenerate:
        user_id = branch[-1].id
        new = [_answer_row(answer_id, user_id, send)]
    else:
        new = [_user_row(user_id, send, branch), _answer_row(answer_id, user_id, send)]
    for offset, row in enumerate(new):
        row.update(conversation_id=cid, created_at=stamp + offset)
    if not send.regenerate:
        branch.append(MessageRow.of(_Inserted(new[0])))
    conn.execute(_INSERT_MESSAGES, new)  # both rows: one statement
    if not created:
        conn.execute(_NEW_LEAF, {"b_cid": cid, "b_leaf": answer_id, "b_stamp": stamp})
    return Opened(TurnRef(cid, user_id, answer_id), branch, created, leaf, send.regenerate)


def _claim_turn(conn: Connection, ref: TurnRef) -> TurnRef | None:
    m = messages.c
    query = select(m.fence).where(m.id == ref.message_id, m.status == "streaming")
    fence = conn.execute(query).scalar()
    if fence is None:
        return None
    conn.execute(update(messages).where(m.id == ref.message_id).values(fence=fence + 1))
    return TurnRef(ref.conversation_id, ref.user_message_id, ref.message_id, fence + 1)


def _finish(conn: Connection, ref: TurnRef, stream_id: str, values: dict[str, Any]) -> bool:
    stored = conn.execute(_FINISH, {"b_id": ref.message_id, "b_fence": ref.fence, **values})
    if stored.rowcount != 1:
        return False
    _release(conn, ref.conversation_id, stream_id)
    return True


def _retract(conn: Connection, opened: Opened, stream_id: str) -> None:
    ref = opened.ref
    ids = [ref.message_id] if opened.regenerate else [ref.message_id, ref.user_message_id]
    conn.execute(messages.delete().where(messages.c.id.in_(ids)))
    if opened.created:
        conn.execute(conversations.delete().where(conversations.c.id == ref.conversation_id))
        return
    conn.execute(
        update(conversations)
        .where(_c.id == ref.conversation_id, _c.active_stream_id == stream_id)
        .values(active_stream_id=None, leaf_id=opened.previous_leaf)
    )


def _abandon(conn: Connection, cid: str, stream_id: str) -> None:
    conn.execute(
        update(messages)
        .where(messages.c.stream_id == stream_id, messages.c.status == "streaming")
        .values(status="error")
    )
    _release(conn, cid, stream_id)


def _page(conn: Connection, owner: str, before: tuple[int, str] | None, limit: int) -> list[Any]:
    c = conversations.c
    query = select(c.id, c.title, c.created_at, c.updated_at, c.active_stream_id).where(
        c.owner == owner
    )
    if before is not None:
        stamp, cid = before
        query = query.where((c.updated_at < stamp) | ((c.updated_at == stamp) & (c.id < cid)))
    query = query.order_by(c.updated_at.desc(), c.id.desc()).limit(limit)
    return list(conn.execute(query).all())


def _set(conn: Connection, owner: str, cid: str, values: dict[str, Any]) -> None:
    _head(conn, owner, cid)
    conn.execute(update(conversations).where(conversations.c.id == cid).values(**values))


def _delete(conn: Connection, owner: str, cid: str) -> str | None:
    head = _head(conn, owner, cid)
    conn.execute(messages.delete().where(messages.c.conversation_id == cid))
    conn.execute(conversations.delete().where(conversations.c.id == cid))
    active: str | None = head.active_stream_id
    return active


def _purge(conn: Connection, older_than_ms: int) -> int:
    old = select(conversations.c.id).where(
        conversations.c.updated_at < older_than_ms,
        conversations.c.active_stream_id.is_(None),
    )
    ids = [row.id for row in conn.execute(old).all()]
    if ids:
        conn.execute(messages.delete().where(messages.c.conversation_id.in_(ids)))
        conn.execute(conversations.delete().where(conversations.c.id.in_(ids)))
    return len(ids)


class _Inserted:
    """A row just inserted, read as a selected one."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def _user_row(user_id: str, send: Send, branch: list[MessageRow]) -> dict[str, Any]:
    return {
        "id": user_id,
        "parent_id": branch[-1].id if branch else None,
        "role": "user",
        "content": send.content,
        "status": "complete",
        "stream_id": None,
        "client_message_id": send.client_message_id,
        "model": None,
        "stop_reason": None,
        "usage": None,
        "fence": 0,
    }


def _answer_row(answer_id: str, parent_id: str, send: Send) -> dict[str, Any]:
    return {
        "id": answer_id,
        "parent_id": parent_id,
        "role": "assistant",
        "content": {"messages": [], "view": []},
        "status": "streaming",
        "stream_id": send.stream_id,
        "client_message_id": None,
        "model": send.model,
        "stop_reason": None,
        "usage": None,
        "fence": 0,
    }


def _conversation(conn: Connection, send: Send, answer_id: str) -> tuple[str, str | None, bool]:
    """The conversation the turn is in, claimed for it: its id, its leaf before the turn,
    and whether it was created now (with the new answer as its leaf already)."""
    cid = send.conversation_id
    if cid is not None:
        try:
            return cid, _claim(conn, cid, send), False
        except NoSuchConversation:
            if not send.create or send.regenerate:
                raise
    cid = cid or new_id()
    _create(conn, cid, send, answer_id)
    return cid, None, True


def _head(conn: Connection, owner: str, cid: str) -> Any:
    row = conn.execute(_HEAD, {"b_cid": cid, "b_owner": owner}).first()
    if row is None:
        raise NoSuchConversation(cid)
    return row


def _create(conn: Connection, cid: str, send: Send, leaf: str) -> None:
    stamp = now_ms()
    row: dict[str, Any] = {"id": cid, "owner": send.owner, "title": _title(send.content)}
    row.update(leaf_id=leaf, active_stream_id=send.stream_id, created_at=stamp, updated_at=stamp)
    conn.execute(_INSERT_CONVERSATION, row)


def _title(content: Any) -> str | None:
    """A new conversation's title: the start of its first message's text."""
    text = (
        content
        if isinstance(content, str)
        else " ".join(
            block.get("text", "") for block in content or () if block.get("type") == "text"
        )
    )
    words = " ".join(text.split())
    return (words[:77] + "...") if len(words) > 80 else (words or None)


def _claim(conn: Connection, cid: str, send: Send) -> str | None:
    """Mark the conversation busy with this turn: its current leaf. Busy or missing raise."""
    claimed = conn.execute(
        _CLAIM, {"b_cid": cid, "b_owner": send.owner, "b_stream": send.stream_id}
    )
    head = _head(conn, send.owner, cid)
    if claimed.rowcount != 1:
        raise Busy(head.active_stream_id)
    leaf: str | None = head.leaf_id
    return leaf


def _release(conn: Connection, cid: str, stream_id: str) -> None:
    conn.execute(_RELEASE, {"b_cid": cid, "b_stream": stream_id, "b_stamp": now_ms()})


def _rows(conn: Connection, cid: str) -> list[MessageRow]:
    return [MessageRow.of(row) for row in conn.execute(_ALL, {"b_cid": cid}).all()]


def _branch(conn: Connection, cid: str, leaf: str | None, send: Send) -> list[MessageRow]:
    """The branch the new turn continues, root first: found on the tree without content,
    then only its own rows read whole (a long conversation's other branches stay unread)."""
    tree = conn.execute(_TREE, {"b_cid": cid}).all()
    ids = [row.id for row in branch_to(tree, _parent_of(tree, leaf, send))]
    if not ids:
        return []
    rows = {row.id: row for row in conn.execute(_BY_IDS, {"b_ids": ids}).all()}
    return [MessageRow.of(rows[i]) for i in ids]


def _existing(conn: Connection, send: Send) -> Existing | None:
    m, c = messages.c, conversations.c
    query = (
        select(m.id, m.conversation_id)
        .join(conversations, c.id == m.conversation_id)
        .where(c.owner == send.owner, m.client_message_id == send.client_message_id)
    )
    if send.conversation_id is not None:
        query = query.where(m.conversation_id == send.conversation_id)
    user = conn.execute(query).first()
    if user is None:
        return None
    answers = conn.execute(
        select(messages)  # the newest: a turn answered again after its worker died
        .where(m.parent_id == user.id, m.role == "assistant")
        .order_by(m.created_at.desc())
    )
    answer = answers.first()
    if answer is None:
        return None
    row = MessageRow.of(answer)
    return Existing(TurnRef(user.conversation_id, user.id, row.id), row)


class Node(Protocol):
    """A message's place in the tree (a :class:`MessageRow`, or a row of ``_TREE``)."""

    @property
    def id(self) -> str: ...
    @property
    def parent_id(self) -> str | None: ...
    @property
    def role(self) -> str: ...


N = TypeVar("N", bound=Node)


def _parent_of(rows: Sequence[Node], leaf: str | None, send: Send) -> str | None:
    """The message the new turn follows: the last of the branch through it is its parent
    (the user message itself when regenerating). Raises ValueError for a parent that cannot
    be one."""
    by_id = {row.id: row for row in rows}
    if send.regenerate:
        target = send.parent_id if send.parent_given else leaf
        row = by_id.get(target or "")
        if row is not None and row.role == "assistant" and not send.parent_given:
            row = by_id.get(row.parent_id or "")
        if row is None or row.role != "user":
            raise ValueError("'regenerate' answers a user message of this conversation again")
        return row.id
    if not send.parent_given:
        return leaf
    if send.parent_id is None:
        return None
    row = by_id.get(send.parent_id)
    if row is None or row.role != "assistant":
        raise ValueError("'parent_id' must be an assistant message of this conversation (or null)")
    return row.id


def branch_to(rows: Sequence[N], last: str | None) -> list[N]:
    """The messages from the first to ``last``, following parents."""
    by_id = {row.id: row for row in rows}
    branch: list[N] = []
    at = by_id.get(last or "")
    while at is not None:
        branch.append(at)
        at = by_id.get(at.parent_id or "")
    branch.reverse()
    return branch
