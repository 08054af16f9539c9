"""A finished turn, kept: stored in its conversation by the task that produced it (never by
the HTTP response, so a reader who left loses nothing), then given to the ``on_turn`` hook.

The store's commit is fenced (a takeover raises the fence, so a producer that was presumed
dead cannot write) and retried with backoff: a database outage never cuts a stream, and a
commit that still fails is logged loudly with the stream id.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .answer import Ended
from .history import reader_view
from .request import ChatRequest
from .stream import Stream
from .tools import ToolScope, in_scope

if TYPE_CHECKING:
    from .db import Conversations

__all__ = ["Turn", "TurnHook", "TurnKeeper", "TurnRef"]

log = logging.getLogger("quart_claude")

#: Seconds between commit attempts (then the last one repeats until the budget is spent).
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
_COMMIT_BUDGET = 60.0


@dataclass(frozen=True, slots=True)
class Turn:
    """What ``@claude.on_turn`` receives once per finished turn."""

    identity: str | None
    stream_id: str
    model: str
    #: the request's messages (with conversations on: the stored history, then the new turn)
    messages: list[dict[str, Any]]
    #: the answer's content blocks, every assistant message's in order
    content: list[dict[str, Any]]
    #: the API messages the answer produced (assistant messages and their tool results)
    answer_messages: list[dict[str, Any]]
    stop_reason: str | None
    status: str  # complete, partial, cancelled or error
    usage: dict[str, Any]
    conversation_id: str | None = None
    user_message_id: str | None = None
    message_id: str | None = None
    #: what the turn cost at the price table (``CLAUDE_PRICES``), in micro-dollars: each
    #: upstream request's, summed (None: the model has no price)
    cost_micro_usd: int | None = None


TurnHook = Callable[[Turn], Any]


@dataclass(frozen=True, slots=True)
class TurnRef:
    """Where a turn's answer is stored; ``fence``: the producer's, raised by a takeover."""

    conversation_id: str
    user_message_id: str
    message_id: str
    fence: int = 0


class TurnKeeper:
    """Keeps the turns of one app: its conversations (or none) and its hooks."""

    def __init__(
        self,
        conversations: Conversations | None,
        hooks: Callable[[], list[TurnHook]],
        scope: Callable[[], ToolScope | None],
    ) -> None:
        self.conversations = conversations
        self._hooks = hooks
        self._scope = scope

    async def claim(self, ref: TurnRef) -> TurnRef:
        """A takeover's turn, fenced for this producer (the old fence if the database is
        unreachable now: the producer it replaces is gone)."""
        if self.conversations is None:
            return ref
        try:
            claimed = await self.conversations.claim(ref)
        except Exception:
            log.exception("turn %s: could not fence the takeover", ref.message_id)
            return ref
        return claimed if claimed is not None else ref

    async def keep(
        self, stream: Stream, request: ChatRequest, ended: Ended, ref: TurnRef | None
    ) -> None:
        """Store the turn (when it is in a conversation), then call the hooks."""
        if ended.status is None:
            return  # it goes on in another worker, which keeps it
        if ref is not None and self.conversations is not None:
            if await self._store(stream, ended, ref) is False:
                return  # fenced out (its successor keeps it) or stored already: hooks ran
        turn = Turn(
            identity=stream.owner,
            stream_id=stream.id,
            model=request.model,
            messages=request.messages,
            content=[
                block
                for message in ended.messages
                if message["role"] == "assistant"
                for block in message["content"]
            ],
            answer_messages=ended.messages,
            stop_reason=ended.stop_reason,
            status=ended.status,
            usage=ended.usage,
            conversation_id=ref.conversation_id if ref else None,
            user_message_id=ref.user_message_id if ref else None,
            message_id=ref.message_id if ref else None,
            cost_micro_usd=ended.cost_micro_usd,
        )
        for hook in self._hooks():
            await self._call(hook, turn)

    async def _store(self, stream: Stream, ended: Ended, ref: TurnRef) -> bool | None:
        """Commit the turn: True when stored, False when refused (fenced out or stored
        already), None when the database never took it (the hooks still run)."""
        assert self.conversations is not None and ended.status is not None
        content = {"messages": ended.messages, "view": reader_view(stream.events)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _COMMIT_BUDGET
        for attempt in range(1000):
            try:
                stored = await self.conversations.finish(
                    ref,
                    stream.id,
                    content=content,
                    status=ended.status,
                    stop_reason=ended.stop_reason,
                    usage=ended.usage,
                )
            except Exception as exc:
                delay = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
                if loop.time() + delay > deadline:
                    log.error(
                        "stream %s: its turn %s could not be stored (%s): the answer is lost "
                        "from the conversation",
                        stream.id,
                        ref.message_id,
                        type(exc).__name__,
                    )
                    return None
                log.warning(
                    "stream %s: storing its turn failed (%s), again in %.1fs",
                    stream.id,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if not stored:
                log.warning("stream %s: turn %s fenced out or stored already", stream.id, ref)
            return bool(stored)
        return None

    async def _call(self, hook: TurnHook, turn: Turn) -> None:
        """One hook: awaited, or in a thread when it is sync; what it raises is logged."""
        try:
            if inspect.iscoroutinefunction(hook):
                await hook(turn)
            else:
                await asyncio.to_thread(in_scope, self._scope(), hook, turn)
        except Exception:
            log.exception("the on_turn hook %s raised (stream %s)", _name(hook), turn.stream_id)


def _name(hook: TurnHook) -> str:
    return getattr(hook, "__qualname__", repr(hook))
