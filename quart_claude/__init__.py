"""quart-claude: stream Claude over Server-Sent Events from any Quart app.

from quart import Quart
from quart_claude import Claude

app = Quart(__name__)
Claude(app)            # POST /chat/stream, GET /health, GET /ready
"""

from ._core.config import DEFAULT_MODEL, ClaudeConfig, ConfigError
from ._core.guards import Blocked, InputCheck, OutputCheck
from ._core.protocol import ERROR_CLASSES, UpstreamError
from ._core.retry import RetryPolicy
from ._core.sse import SSEEvent, SSEParser
from ._core.state import ClaudeState
from ._core.tools import ToolContext
from ._core.turns import Turn
from ._quart import Claude
from ._version import __version__ as __version__

__all__ = [
    "DEFAULT_MODEL",
    "ERROR_CLASSES",
    "Blocked",
    "Claude",
    "ClaudeConfig",
    "ClaudeState",
    "ConfigError",
    "InputCheck",
    "OutputCheck",
    "RetryPolicy",
    "SSEEvent",
    "SSEParser",
    "ToolContext",
    "Turn",
    "UpstreamError",
]
