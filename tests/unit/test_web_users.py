"""``parvisor user add|list|remove`` and ``python -m parvisor.web.users``: the users
file they write is the one the console's login reads; refused input changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from parvisor.cli.main import app
from parvisor.cli import user_commands  # noqa: F401  (registers ``user``)
from parvisor.errors import AlreadyExists, InvalidInput, NotFound, Unauthorized
from parvisor.web.auth import Authenticator, Role
from parvisor.web.users import add_user, list_users, remove_user, users_file

PARVISOR = str(Path(sys.executable).with_name("parvisor"))


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def _cli(state: Path, *args: str, stdin: str = ""):
    return CliRunner().invoke(app, ["--state-dir", str(state), "user", *args], input=stdin)


def _login_role(state: Path, name: str, password: str) -> Role:
    return Authenticator(users_file(state), tokens=lambda: ()).login(
        user=name, password=password).role


def test_added_users_can_log_in_with_their_role(state):
    assert _cli(state, "add", "ann", "--role", "administrator", "--password-stdin",
                stdin="admin-pass-1\n").exit_code == 0
    assert _cli(state, "add", "vic", "--role", "viewer", "--password-stdin",
                stdin="viewer-pass-1\n").exit_code == 0
    assert _login_role(state, "ann", "admin-pass-1") is Role.ADMINISTRATOR
    assert _login_role(state, "vic", "viewer-pass-1") is Role.VIEWER
    listed = _cli(state, "list", "--json")
    assert json.loads(listed.stdout) == [{"name": "ann", "role": "administrator"},
                                         {"name": "vic", "role": "viewer"}]
    assert (state / "users.json").stat().st_mode & 0o777 == 0o600


def test_refused_input_changes_nothing(state):
    _cli(state, "add", "ann", "--role", "viewer", "--password-stdin", stdin="first-pass-1\n")
    before = (state / "users.json").read_bytes()
    duplicate = _cli(state, "add", "ann", "--role", "administrator", "--password-stdin",
                     stdin="other-pass-1\n")
    assert isinstance(duplicate.exception, AlreadyExists)
    empty = _cli(state, "add", "bob", "--role", "viewer", "--password-stdin", stdin="\n")
    assert isinstance(empty.exception, InvalidInput) and "password" in str(empty.exception)
    bad_role = _cli(state, "add", "bob", "--role", "root", "--password-stdin",
                    stdin="bob-pass-12\n")
    assert bad_role.exit_code == 2 and "viewer" in bad_role.output
    bad_name = _cli(state, "add", "a:b", "--role", "viewer", "--password-stdin",
                    stdin="bob-pass-12\n")
    assert isinstance(bad_name.exception, InvalidInput)
    missing = _cli(state, "remove", "nobody")
    assert isinstance(missing.exception, NotFound)
    assert (state / "users.json").read_bytes() == before
    assert _login_role(state, "ann", "first-pass-1") is Role.VIEWER


def test_replace_changes_password_and_role_and_remove_ends_logins(state):
    users = users_file(state)
    add_user(users, "ann", "first-pass-1", "viewer")
    add_user(users, "ann", "second-pass-1", "administrator", replace=True)
    assert _login_role(state, "ann", "second-pass-1") is Role.ADMINISTRATOR
    remove_user(users, "ann")
    assert list_users(users) == []
    with pytest.raises(Unauthorized):
        _login_role(state, "ann", "second-pass-1")


def test_unknown_role_in_the_library_is_a_clear_error(state):
    with pytest.raises(InvalidInput, match="unknown role 'root'"):
        add_user(users_file(state), "ann", "first-pass-1", "root")
    assert not (state / "users.json").exists()


def test_cli_and_module_print_one_line_errors(state):
    env = {"PARVISOR_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([PARVISOR, "user", "add", "ann", "--role", "viewer",
                            "--password-stdin"], input="first-pass-1\n", text=True,
                           capture_output=True, env=env)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "parvisor.web.users", "add", "ann",
                            "--role", "viewer", "--password-stdin"], input="x-pass-123\n",
                           text=True, capture_output=True, env=env)
    assert again.returncode == 1 and again.stderr.strip() == (
        "error: user 'ann' exists (--replace changes its password and role)")
    listed = subprocess.run([sys.executable, "-m", "parvisor.web.users", "list"],
                            text=True, capture_output=True, env=env, check=True)
    assert listed.stdout == "ann\tviewer\n"
