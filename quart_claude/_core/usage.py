"""Usage as the API reports it, added up over the requests of one answer.

Within one message, ``message_delta``'s usage replaces ``message_start``'s field by field
(running totals; it may revise ``input_tokens``). Across the requests of an answer (retries
that got some way, continuations, tool steps, takeovers) every count is a sum, nested counts
too (``cache_creation``'s 5-minute and 1-hour writes, ``server_tool_use``'s requests,
``output_tokens_details``), ``iterations`` are kept in order, and labels (``service_tier``,
``inference_geo``) are the last one reported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_usage"]


def add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add one request's ``usage`` into the answer's ``total``, in place."""
    for key, value in usage.items():
        if isinstance(value, bool) or value is None or isinstance(value, str | float):
            if value is not None or key not in total:
                total[key] = value
        elif isinstance(value, int):
            total[key] = int(total.get(key) or 0) + value
        elif isinstance(value, dict):
            nested = dict(total.get(key) or {})
            add_usage(nested, value)
            total[key] = nested
        elif isinstance(value, list):
            total[key] = [*(total.get(key) or []), *value]
