"""The console listener's gate: authentication, CSRF and roles for every request.

A plain ASGI middleware rather than a FastAPI dependency so that nothing mounted on the
app (JSON API, pages, static files, the console WebSocket, ``/metrics``) can be reached
around it. Rules, in order:

1. a few public paths (the login page, its assets, the login call) pass;
2. ``Authorization: Bearer <api token>`` is an administrator (scripts, Prometheus);
   no CSRF check: a browser never attaches that header by itself;
3. otherwise the session cookie must name a live session, else 401 (JSON) or a
   redirect to the login page (page requests);
4. a change (any method but GET/HEAD/OPTIONS) over a cookie session must carry the
   session's CSRF token in ``X-CSRF-Token``; WebSockets must come from our own origin;
5. a viewer may not change anything (403), nor use a VM's serial or graphical
   console (every WebSocket needs an administrator).

``WebSocketTokenGuard`` is the token listener's counterpart for WebSockets, which its
HTTP middleware (``parvisor.api.app``) never sees.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import quote

from parvisor.web.auth import Authenticator, Role

SESSION_COOKIE = "parvisor_session"
CSRF_COOKIE = "parvisor_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
PUBLIC_PATHS = {"/ui/login", "/ui/api/login", "/favicon.ico"}
PUBLIC_PREFIXES = ("/ui/static/",)
VIEWER_MAY_POST = {"/ui/api/logout"}
# Scripts may not come from anywhere else; styles may be inline because xterm.js
# creates <style> elements for its renderer.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; "
     b"style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ConsoleGuard:
    def __init__(self, app: Callable, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, _with_headers(send))
        headers = _headers(scope)
        role, by_cookie, session = self._principal(headers)
        if role is None:
            if method == "GET" and (path == "/" or path.startswith("/ui/")) \
                    and not path.startswith("/ui/api/"):
                return await _redirect(send, "/ui/login?next=" + quote(path, safe="/"))
            return await _json_error(send, 401, "unauthorized",
                                     "log in first (session expired or missing)")
        if method not in SAFE_METHODS:
            if by_cookie and headers.get(CSRF_HEADER, "") != session.csrf:
                return await _json_error(send, 403, "csrf", "missing or wrong CSRF token")
            if role is not Role.ADMINISTRATOR and path not in VIEWER_MAY_POST:
                return await _json_error(send, 403, "forbidden",
                                         "this action needs the administrator role")
        scope.setdefault("state", {})["principal"] = (session.user if session else "token",
                                                      role)
        await self.app(scope, receive, _with_headers(send))

    def _principal(self, headers: dict[str, str]) -> tuple[Role | None, bool, Any]:
        bearer = headers.get("authorization", "")
        if bearer.startswith("Bearer "):
            ok = self.auth.token_valid(bearer.removeprefix("Bearer ").strip())
            return (Role.ADMINISTRATOR if ok else None), False, None
        session = self.auth.session(_cookie(headers, SESSION_COOKIE))
        return (session.role if session else None), True, session

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        role, by_cookie, session = self._principal(headers)
        origin_ok = not by_cookie or _same_origin(headers)
        if role is Role.ADMINISTRATOR and origin_ok:
            scope.setdefault("state", {})["principal"] = (
                session.user if session else "token", role)
            return await self.app(scope, receive, send)
        await receive()                       # the websocket.connect message
        code = 4401 if role is None else 4403
        await send({"type": "websocket.close", "code": code,
                    "reason": "log in as an administrator to use the console"})


class WebSocketTokenGuard:
    """On the TCP API listener: a WebSocket (serial or graphical console) needs
    ``Authorization: Bearer <api token>`` like every HTTP request there."""

    def __init__(self, app: Callable, tokens: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or self._valid(_headers(scope)):
            return await self.app(scope, receive, send)
        await receive()                       # the websocket.connect message
        await send({"type": "websocket.close", "code": 4401,
                    "reason": "a valid API token is required"})

    def _valid(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(given) and any(hmac.compare_digest(given.encode(), t.encode())
                                   for t in self.tokens)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _cookie(headers: dict[str, str], name: str) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is just "not logged in"
        return None
    return jar[name].value if name in jar else None


def _same_origin(headers: dict[str, str]) -> bool:
    origin = headers.get("origin", "")
    host = headers.get("host", "")
    return bool(host) and origin.split("://", 1)[-1] == host


def _with_headers(send: Send) -> Send:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              *SECURITY_HEADERS]}
        await send(message)
    return wrapped


async def _redirect(send: Send, location: str) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": b""})


async def _json_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
