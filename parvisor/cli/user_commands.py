"""``parvisor user add|list|remove``: the web console's local users.

These commands edit ``<state>/users.json`` on this host directly (root, like the state
directory itself) rather than going through the API: a host without a running service
can get its first administrator. The running service picks changes up at the next
login. Operations: ``parvisor.web.users``.
"""

from __future__ import annotations

from enum import Enum

import typer
from rich.table import Table
from rich.text import Text

from parvisor.cli.main import STATE, JsonOpt, app, emit, out
from parvisor.config import state_dir_from_env
from parvisor.web.users import add_user, list_users, read_password, remove_user, users_file

user_app = typer.Typer(no_args_is_help=True,
                       help="Web console users (local logins: viewer or administrator).")
app.add_typer(user_app, name="user")


class RoleChoice(str, Enum):
    viewer = "viewer"
    administrator = "administrator"


def _users():
    return users_file(state_dir_from_env(STATE["state_dir"]))


@user_app.command("add")
def add(name: str,
        role: RoleChoice = typer.Option(..., "--role", help="viewer|administrator"),
        password_stdin: bool = typer.Option(False, "--password-stdin",
                                            help="Read the password from one line of stdin."),
        replace: bool = typer.Option(False, "--replace",
                                     help="Change an existing user's password and role."),
        as_json: bool = JsonOpt) -> None:
    """Add a user (asks for the password twice unless --password-stdin)."""
    user = add_user(_users(), name, read_password(name, password_stdin), role.value,
                    replace=replace)
    emit({"name": user.name, "role": user.role.value}, as_json,
         Text(f"user {user.name} ({user.role.value}) saved"))


@user_app.command("list")
def list_(as_json: bool = JsonOpt) -> None:
    """Users and their roles."""
    def human(rows: list[dict[str, str]]) -> None:
        table = Table("NAME", "ROLE", box=None)
        for row in rows:
            table.add_row(Text(row["name"]), Text(row["role"]))   # names are text
        out.print(table)
    emit(list_users(_users()), as_json, human)


@user_app.command("remove")
def remove(name: str) -> None:
    """Remove a user (sessions it has open end at their next expiry or logout)."""
    remove_user(_users(), name)
    out.print(f"user {name} removed", markup=False)
