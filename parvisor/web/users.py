"""The web console's local users: add, list, remove (``<state>/users.json``).

The command line is ``parvisor user add|list|remove`` (``parvisor.cli.user_commands``);
``python -m parvisor.web.users`` is kept as an alias of the same operations for
scripts written before it:

    parvisor user add alice --role administrator                 # asks for a password
    echo "$PW" | parvisor user add bob --role viewer --password-stdin
    parvisor user list | parvisor user remove NAME

The file is changed under an exclusive lock (two commands at once lose nothing) and
atomically (the running service, which re-reads it when it changes, never sees half a
file); a refused change leaves it as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
from pathlib import Path
from typing import Iterator

from parvisor.config import state_dir_from_env
from parvisor.errors import AlreadyExists, InvalidInput, NotFound, ParvisorError
from parvisor.web import USERS_FILE
from parvisor.web.auth import Role, User, UsersFile, make_user


def users_file(state_dir: Path) -> UsersFile:
    return UsersFile(state_dir / USERS_FILE)


@contextlib.contextmanager
def _locked(users: UsersFile) -> Iterator[dict[str, User]]:
    """The users as they are now, to change; saved when the block ends without error."""
    users.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(users.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        users._cache = None          # another command may have changed it meanwhile
        current = dict(users.users())
        yield current
        users.save(current)
    finally:
        os.close(fd)


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidInput(f"unknown role {role!r}: use "
                           + " or ".join(r.value for r in Role), field="role") from None


def add_user(users: UsersFile, name: str, password: str, role: str, *,
             replace: bool = False) -> User:
    """A new user (``replace``: or a new password/role for an existing one)."""
    user = make_user(name, password, parse_role(role))   # validates before any change
    with _locked(users) as current:
        if name in current and not replace:
            raise AlreadyExists(f"user {name!r} exists (--replace changes its password "
                                "and role)", user=name)
        current[name] = user
    return user


def remove_user(users: UsersFile, name: str) -> None:
    with _locked(users) as current:
        if current.pop(name, None) is None:
            raise NotFound(f"no user {name!r}", user=name)


def list_users(users: UsersFile) -> list[dict[str, str]]:
    return [{"name": u.name, "role": u.role.value}
            for u in sorted(users.users().values(), key=lambda u: u.name)]


def read_password(name: str, from_stdin: bool) -> str:
    """One line from stdin, or asked twice on the terminal (a typo is not saved)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != password:
        raise InvalidInput("the two passwords differ", field="password")
    return password


# --- python -m parvisor.web.users (kept for existing scripts) -------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parvisor.web.users",
                                     description="web console users (= parvisor user)")
    parser.add_argument("--state-dir")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--role", required=True)
    add.add_argument("--password-stdin", action="store_true")
    add.add_argument("--replace", action="store_true",
                     help="change an existing user's password and role")
    sub.add_parser("list", help="list users and roles")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    users = users_file(state_dir_from_env(args.state_dir))
    try:
        if args.command == "list":
            for user in list_users(users):
                print(f"{user['name']}\t{user['role']}")
        elif args.command == "remove":
            remove_user(users, args.name)
        else:
            add_user(users, args.name, read_password(args.name, args.password_stdin),
                     args.role, replace=args.replace)
    except ParvisorError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
