"""Manage the web console's local users: ``python -m parvisor.web.users``.

    python -m parvisor.web.users add alice --role administrator   # asks for a password
    echo "$PW" | python -m parvisor.web.users add bob --role viewer --password-stdin
    python -m parvisor.web.users list | remove NAME

Writes ``<state dir>/users.json`` (``--state-dir`` or ``PARVISOR_STATE_DIR``); the
running service picks changes up on the next login, without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from parvisor.config import state_dir_from_env
from parvisor.errors import ParvisorError
from parvisor.web import USERS_FILE
from parvisor.web.auth import Role, UsersFile, make_user


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parvisor.web.users",
                                     description="web console users")
    parser.add_argument("--state-dir")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user or change a user's password/role")
    add.add_argument("name")
    add.add_argument("--role", choices=[r.value for r in Role], default=Role.VIEWER.value)
    add.add_argument("--password-stdin", action="store_true")
    sub.add_parser("list", help="list users and roles")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir = state_dir_from_env(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    users_file = UsersFile(state_dir / USERS_FILE)
    try:
        users = dict(users_file.users())
        if args.command == "list":
            for user in sorted(users.values(), key=lambda u: u.name):
                print(f"{user.name}\t{user.role.value}")
            return 0
        if args.command == "remove":
            if users.pop(args.name, None) is None:
                print(f"no user {args.name}", file=sys.stderr)
                return 1
        else:
            password = (sys.stdin.readline().rstrip("\n") if args.password_stdin
                        else getpass.getpass(f"password for {args.name}: "))
            users[args.name] = make_user(args.name, password, Role(args.role))
        users_file.save(users)
    except ParvisorError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
