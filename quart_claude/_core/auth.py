"""Who is asking: the bearer tokens (``CLAUDE_API_TOKENS``), the ``authorize`` hook's answer,
and whether conversations without either get an anonymous identity (a signed cookie, read
by :func:`~.web.identity_of`). One job, apart from the rest of the state."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

__all__ = ["Auth", "Authorize", "Unauthorized"]

#: ``fn(request) -> identity | None``, sync or async (sync only on Flask), given the
#: framework's request object.
Authorize = Callable[[Any], Any]


class Unauthorized(Exception):
    """The request may not use the routes: answered 401."""


class Auth:
    """An app's rules of identity. ``hook``: the extension's ``authorize`` hook, read each
    time (it may be set after ``init_app``); ``conversations_on``: whether conversations are
    on (then a caller without auth is anonymous, by cookie)."""

    def __init__(
        self,
        tokens: tuple[str, ...],
        hook: Callable[[], Authorize | None],
        conversations_on: Callable[[], bool],
    ) -> None:
        self.tokens = tokens
        self._hook = hook
        self._conversations_on = conversations_on
        #: signs the anonymous identity's cookie (the host app's SECRET_KEY)
        self.secret_key: str | bytes | None = None

    @property
    def hook(self) -> Authorize | None:
        """The ``authorize`` hook; the front end calls it in its own request context."""
        return self._hook()

    @property
    def anonymous(self) -> bool:
        """No auth configured: with conversations on, a signed cookie says whose they are."""
        return self._conversations_on() and not self.tokens and not self.hook

    def check_token(self, authorization: str | None) -> str | None:
        """The identity a request's ``Authorization`` header proves, or None when the app has
        no tokens. Raises :class:`Unauthorized`.

        Who is asking decides who may use the routes, who owns a stream and the rate-limit
        key: the ``authorize`` hook's answer when there is a hook (see :meth:`hook_identity`),
        else the token's, else None (no auth: a stream id is the capability to read or stop
        it)."""
        tokens = self.tokens
        if not tokens:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        offered = given.strip().encode() if scheme.lower() == "bearer" else b""
        # every token compared in constant time, none skipped: no timing says which failed
        matches = [t for t in tokens if hmac.compare_digest(offered, t.encode())]
        if not offered or not matches:
            raise Unauthorized("a valid 'Authorization: Bearer <token>' is required")
        return "token:" + hashlib.sha256(matches[0].encode()).hexdigest()[:16]

    @staticmethod
    def hook_identity(value: Any) -> str:
        """The identity of an ``authorize`` hook's answer; None refuses the request."""
        if value is None:
            raise Unauthorized("this request is not authorized")
        return str(value)
