"""The curated public API: exactly these names, each importable and documented."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.core

PUBLIC = {
    "quart_claude": {
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
    },
    "quart_claude.flask": {
        "Blocked",
        "Claude",
        "InputCheck",
        "OutputCheck",
        "ToolContext",
        "Turn",
        "post_worker_init",
    },
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_exported_names(module: str) -> None:
    imported = importlib.import_module(module)
    assert set(imported.__all__) == PUBLIC[module]
    for name in imported.__all__:
        value = getattr(imported, name)
        if callable(value):
            assert value.__doc__, f"{module}.{name} has no docstring"


def test_both_front_ends_hand_out_the_same_state_class() -> None:
    import quart_claude
    import quart_claude.flask

    quart_state = quart_claude.Claude.state.__annotations__["return"]
    flask_state = quart_claude.flask.Claude.state.__annotations__["return"]
    assert quart_state == flask_state == "ClaudeState"
