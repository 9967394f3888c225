"""Who may use the web console, and as what: local users, API tokens, sessions, roles.

Two roles: ``viewer`` (reads everything, changes nothing) and ``administrator``.
A person logs in with a local user (``<state>/users.json``, scrypt hashes with a
per-user salt) or with one of the host's API tokens (``api_tokens``: administrator).
A login creates a server-side session (in memory: a service restart logs everyone out)
with its own CSRF token; the browser gets two cookies, the HttpOnly session id and the
readable CSRF token, and must echo the latter in ``X-CSRF-Token`` on every change
(double submit: another site can make the browser *send* the cookies but cannot *read*
one to copy it into a header).

Manage users with ``python -m parvisor.web.users`` (see ``docs/web-console.md``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from parvisor.errors import Forbidden, InvalidInput, Unauthorized

USERS_FILE_VERSION = 1
SESSION_IDLE_S = 30 * 60          # a forgotten tab logs out after half an hour
SESSION_MAX_S = 12 * 3600         # and every session after a working day
MIN_PASSWORD = 8
# scrypt cost: n=2**14, r=8 (16 MiB, ~50 ms) - the interactive figure from the RFC 7914
SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}


class Role(str, enum.Enum):
    VIEWER = "viewer"
    ADMINISTRATOR = "administrator"


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    salt: str                 # hex
    hash: str                 # hex scrypt(password, salt)
    n: int = SCRYPT["n"]
    r: int = SCRYPT["r"]
    p: int = SCRYPT["p"]

    def check(self, password: str) -> bool:
        digest = _scrypt(password, bytes.fromhex(self.salt), self.n, self.r, self.p)
        return hmac.compare_digest(digest.hex(), self.hash)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=64 << 20)


def make_user(name: str, password: str, role: Role) -> User:
    if not name or len(name) > 64 or not name.isprintable() or ":" in name:
        raise InvalidInput(f"user name {name!r} is not allowed", field="name")
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"the password needs at least {MIN_PASSWORD} characters",
                           field="password")
    salt = os.urandom(16)
    return User(name, Role(role), salt.hex(), _scrypt(password, salt, **SCRYPT).hex())


class UsersFile:
    """``users.json`` (mode 0600), re-read when it changes so edits need no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[float, dict[str, User]] | None = None

    def users(self) -> dict[str, User]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cache is None or self._cache[0] != mtime:
            self._cache = (mtime, self._parse())
        return self._cache[1]

    def _parse(self) -> dict[str, User]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            users = [User(**{**u, "role": Role(u["role"])}) for u in data["users"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{self.path}: {exc}", path=str(self.path)) from exc
        return {user.name: user for user in users}

    def save(self, users: dict[str, User]) -> None:
        data = {"version": USERS_FILE_VERSION,
                "users": [{**user.__dict__, "role": user.role.value}
                          for user in sorted(users.values(), key=lambda u: u.name)]}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
        os.replace(tmp, self.path)
        self._cache = None


@dataclass
class Session:
    id: str
    user: str
    role: Role
    csrf: str
    created: float
    last_seen: float = field(default=0.0)


class Authenticator:
    """Checks credentials and keeps the sessions; ``clock`` is injectable for tests."""

    def __init__(self, users: UsersFile, tokens: Callable[[], tuple[str, ...]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.users = users
        self.tokens = tokens
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def login(self, *, user: str = "", password: str = "", token: str = "") -> Session:
        """A new session for valid credentials; one vague message for any mistake."""
        role = self._token_role(token) if token else self._user_role(user, password)
        if role is None:
            raise Unauthorized("wrong user name, password or token")
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), user or "token", role,
                          secrets.token_urlsafe(24), now, now)
        self._sessions[session.id] = session
        return session

    def _token_role(self, token: str) -> Role | None:
        return Role.ADMINISTRATOR if self.token_valid(token) else None

    def token_valid(self, token: str) -> bool:
        return bool(token) and any(hmac.compare_digest(token.encode(), known.encode())
                                   for known in self.tokens())

    def _user_role(self, name: str, password: str) -> Role | None:
        user = self.users.users().get(name)
        if user is None:
            make_user("x", "timing-equaliser", Role.VIEWER)   # same cost as a real check
            return None
        return user.role if user.check(password) else None

    def session(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value, touched; expired ones are dropped."""
        session = self._sessions.get(session_id or "")
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen > SESSION_IDLE_S or now - session.created > SESSION_MAX_S:
            del self._sessions[session.id]
            return None
        session.last_seen = now
        return session

    def logout(self, session_id: str | None) -> None:
        self._sessions.pop(session_id or "", None)


def require_admin(role: Role, what: str) -> None:
    if role is not Role.ADMINISTRATOR:
        raise Forbidden(f"{what} needs the administrator role (you are a viewer)",
                        role=role.value)
