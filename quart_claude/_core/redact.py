"""Secrets never reach a log line or an event: API keys are cut out of text on the way out.

An upstream error may echo the key it was sent (in a 401 body, say); a traceback may carry
it in an exception message. :func:`redact` replaces each registered key, and anything shaped
like an Anthropic key (``sk-ant-…``), a Google access token (``ya29.…``) or a Bedrock API key
(``ABSK…``), with ``[redacted]``; :func:`install` applies it to every
log record of the process, tracebacks included.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["install", "redact", "register_secret"]

# shaped like a secret whoever holds it: an Anthropic key, a Google OAuth access token
# (fetched at run time by google-auth, so never registered), a Bedrock API key
_SHAPED = r"sk-ant-[A-Za-z0-9_\-]{8,}|ya29\.[A-Za-z0-9_\-.]{8,}|ABSK[A-Za-z0-9+/=]{16,}"
_secrets: set[str] = set()
_pattern = re.compile(_SHAPED)


def register_secret(secret: str | None) -> None:
    """Redact ``secret`` from now on in this process (keys shorter than 8 are not worth it)."""
    global _pattern
    if secret and len(secret) >= 8 and secret not in _secrets:
        _secrets.add(secret)
        alternatives = [re.escape(s) for s in sorted(_secrets, key=len, reverse=True)]
        _pattern = re.compile("|".join([*alternatives, _SHAPED]))


def redact(text: str) -> str:
    return _pattern.sub("[redacted]", text)


def _clean(record: logging.LogRecord) -> logging.LogRecord:
    """Redact the message, the arguments and the traceback text of ``record``."""
    message = record.getMessage()
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


_installed = False


def install() -> None:
    """Redact every log record this process creates, whichever library logs it (the SDK and
    its HTTP client log response headers at DEBUG, and an upstream may echo the key there).

    Wraps the process's log record factory once; the factory in place before is kept.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return _clean(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = True
