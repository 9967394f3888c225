"""Web console auth: users file, sessions (expiry on a fake clock), the ASGI guard's
rules (CSRF, roles, redirects) on a tiny app without a host service."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from parvisor.errors import InvalidInput, Unauthorized
from parvisor.web.auth import (SESSION_IDLE_S, Authenticator, Role, UsersFile,
                               make_user)
from parvisor.web.guard import CSRF_COOKIE, SESSION_COOKIE, ConsoleGuard


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def auth(tmp_path):
    users = UsersFile(tmp_path / "users.json")
    users.save({"ann": make_user("ann", "admin-pass-1", Role.ADMINISTRATOR),
                "vic": make_user("vic", "viewer-pass-1", Role.VIEWER)})
    return Authenticator(users, tokens=lambda: ("tok-abcdef",), clock=Clock())


def test_users_file_is_private_and_salted(tmp_path, auth):
    path = tmp_path / "users.json"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "admin-pass-1" not in text
    first, second = make_user("x", "same-password", Role.VIEWER), make_user(
        "x", "same-password", Role.VIEWER)
    assert first.salt != second.salt and first.hash != second.hash


def test_login_roles_and_wrong_credentials(auth):
    assert auth.login(user="ann", password="admin-pass-1").role is Role.ADMINISTRATOR
    assert auth.login(user="vic", password="viewer-pass-1").role is Role.VIEWER
    assert auth.login(token="tok-abcdef").role is Role.ADMINISTRATOR
    for bad in ({"user": "ann", "password": "nope"}, {"user": "who", "password": "x"},
                {"token": "tok-wrong"}, {}):
        with pytest.raises(Unauthorized):
            auth.login(**bad)


def test_short_password_refused():
    with pytest.raises(InvalidInput):
        make_user("bob", "short", Role.VIEWER)


def test_session_expires_when_idle(auth):
    session = auth.login(user="ann", password="admin-pass-1")
    auth.clock.now += SESSION_IDLE_S - 1
    assert auth.session(session.id) is session           # touched: idle time restarts
    auth.clock.now += SESSION_IDLE_S + 1
    assert auth.session(session.id) is None
    assert auth.session(session.id) is None              # and stays gone


def _guarded_client(auth) -> TestClient:
    app = FastAPI()
    app.get("/v1/vms")(lambda: [])
    app.post("/v1/vms/{name}/start")(lambda name: {"started": name})
    app.get("/ui/")(lambda: "page")
    app.add_middleware(ConsoleGuard, auth=auth)
    return TestClient(app, follow_redirects=False)


def _login(client, auth, **credentials):
    session = auth.login(**credentials)
    client.cookies.set(SESSION_COOKIE, session.id)
    client.cookies.set(CSRF_COOKIE, session.csrf)
    return session


def test_guard_anonymous(auth):
    client = _guarded_client(auth)
    assert client.get("/v1/vms").status_code == 401
    page = client.get("/ui/")
    assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
    assert client.get("/v1/vms", headers={"authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/vms", headers={"authorization": "Bearer tok-abcdef"}
                      ).status_code == 200


def test_guard_csrf_and_roles(auth):
    client = _guarded_client(auth)
    admin = _login(client, auth, user="ann", password="admin-pass-1")
    assert client.post("/v1/vms/a/start").status_code == 403           # no CSRF header
    assert client.post("/v1/vms/a/start", headers={"x-csrf-token": "forged"}
                       ).status_code == 403
    assert client.post("/v1/vms/a/start", headers={"x-csrf-token": admin.csrf}
                       ).json() == {"started": "a"}
    viewer = _login(client, auth, user="vic", password="viewer-pass-1")
    assert client.get("/v1/vms").status_code == 200
    refused = client.post("/v1/vms/a/start", headers={"x-csrf-token": viewer.csrf})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert "content-security-policy" in client.get("/v1/vms").headers
