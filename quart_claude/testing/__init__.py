"""An offline emulator of the Anthropic Messages API, for tests and demo mode.

    from quart_claude.testing import Emulator, Reply, ErrorReply

    async with Emulator() as emu:
        emu.script(ErrorReply(529), Reply("Hello!"))
        app.config["CLAUDE_BASE_URL"] = emu.url

Run it alone with ``python -m quart_claude.testing --port 8001``.
"""

from ._emulator import (
    CONTINUE_MARKER,
    Emulator,
    ErrorReply,
    Hangup,
    RecordedRequest,
    Replay,
    Reply,
    Scripted,
    ToolUse,
)
from ._tls import certificates

__all__ = [
    "CONTINUE_MARKER",
    "Emulator",
    "ErrorReply",
    "Hangup",
    "RecordedRequest",
    "Replay",
    "Reply",
    "Scripted",
    "ToolUse",
    "certificates",
]
