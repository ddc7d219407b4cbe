"""Guards in front of every route: the host names and origins the UI answers (against DNS rebinding and foreign
pages), `personalize ui --auth user:password` (HTTP Basic, the websocket too) and a request-size limit for uploads.

An ASGI middleware (not Starlette's BaseHTTPMiddleware, which never sees websockets): a page request without the
right credentials gets 401 and the browser's login prompt; an authenticated page request also sets a cookie
holding a per-server random token, because browsers send cookies, but not always Basic credentials, with the
websocket that carries the page's events.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import socket
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

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


# -- host names and origins -------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_host_names(host: str, extra: tuple[str, ...] = ()) -> set[str]:
    """The names a browser may use to reach a UI listening on `host`: that name, the loopback names when it listens
    there, this machine's own names and addresses when it listens everywhere (0.0.0.0), and `--allow-host` names."""
    names = {host.lower().strip("[]"), *LOOPBACK_NAMES, *(e.lower().strip("[]") for e in extra)} - {""}
    if _is_wildcard(host):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names.update(socket.gethostbyname_ex(name)[2])
            except OSError:
                pass
    elif not _is_loopback(host):
        names -= set(LOOPBACK_NAMES) - {host}  # a UI on one address answers only that address's name
    return names


def _host_name(authority: str) -> str:
    """'Example.org:8080' -> 'example.org', '[::1]:8080' -> '::1'."""
    return (urlsplit(f"//{authority}").hostname or "").lower()


def _same_site(origin: str, host: str) -> bool:
    """Whether a page at `origin` (scheme://name[:port]) is this UI's own page, reached at `host` (name[:port])."""
    theirs, ours = urlsplit(origin), urlsplit(f"//{host}")
    try:
        return (theirs.hostname or "").lower() == (ours.hostname or "").lower() and theirs.port == ours.port
    except ValueError:  # a malformed port
        return False


class SameOrigin:
    """Answer only requests addressed to a name the UI listens on, and only from its own pages.

    Without this, any web page the user visits could drive the UI: through DNS rebinding (evil.example resolves to
    127.0.0.1, so the browser sends `Host: evil.example`: refused here, 421), or by posting to / opening a websocket
    on http://127.0.0.1:PORT from its own origin (the browser then sends `Origin: https://evil.example`: refused,
    403). Requests without an Origin header come from the page itself (a browser sends no Origin with a same-origin
    navigation or image) or from a program, not from another site's page.
    """

    def __init__(self, app, allowed_hosts: set[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        problem = None
        if _host_name(host) not in self.allowed:
            problem = (421, f"personalize ui does not answer for host {host!r}: open it by the address it prints "
                            "(personalize ui --allow-host NAME adds a name)")
        elif "origin" in headers and not _same_site(headers["origin"], host):
            problem = (403, f"personalize ui refuses requests from other sites' pages (Origin {headers['origin']!r})")
        if problem is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send({"type": "http.response.start", "status": problem[0], "headers": [(b"content-type", b"text/plain")]})
        return await send({"type": "http.response.body", "body": problem[1].encode()})
