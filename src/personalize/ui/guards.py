"""Guards in front of every route: `personalize ui --auth user:password` (HTTP Basic, the websocket too) and a
request-size limit for uploads.

An ASGI middleware (not Starlette's BaseHTTPMiddleware, which never sees websockets): a page request without the
right credentials gets 401 and the browser's login prompt; an authenticated page request also sets a cookie
holding a per-server random token, because browsers send cookies, but not always Basic credentials, with the
websocket that carries the page's events.
"""

from __future__ import annotations

import base64
import secrets
from http.cookies import SimpleCookie

COOKIE = "personalize_ui"


def parse_auth(text: str) -> tuple[str, str]:
    from ..errors import PersonalizeError

    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise PersonalizeError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


class BasicAuth:
    def __init__(self, app, user: str, password: str):
        self.app = app
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.token = secrets.token_urlsafe(32)  # new at every start: a restarted UI asks again

    def _headers(self, scope) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

    def _authorised(self, headers: dict[str, str]) -> bool:
        if secrets.compare_digest(headers.get("authorization", ""), self.expected):
            return True
        cookie = SimpleCookie(headers.get("cookie", ""))
        return COOKIE in cookie and secrets.compare_digest(cookie[COOKIE].value, self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = self._headers(scope)
        if not self._authorised(headers):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"www-authenticate", b'Basic realm="personalize"'), (b"content-type", b"text/plain")]})
            return await send({"type": "http.response.body", "body": b"personalize ui: log in (personalize ui --auth)"})

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie if scope["type"] == "http" else send)


class UploadLimit:
    """Refuse a request body announced larger than `limit` bytes (413) before it is read: the browser's own size
    check can be bypassed, this one cannot (each file is checked against the per-file limit again when kept)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers", [])).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.limit:
                await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
                return await send({"type": "http.response.body", "body": b"upload too large (personalize ui --max-upload-mb)"})
        return await self.app(scope, receive, send)
