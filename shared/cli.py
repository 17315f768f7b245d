"""``voxelflow`` command line (also ``python -m shared.cli``): tokens, configuration, the local stack.

``tokens`` talks to the database named by ``VOXELFLOW_DATABASE_URL`` (after running migrations);
``config`` lists every ``VOXELFLOW_*`` variable of the shared settings and of each service's settings
class with its default and description.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from shared.settings import VoxelflowSettings

SERVICES_DIR = Path(__file__).resolve().parents[1] / "services"


def _settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    found: list[tuple[str, type[BaseSettings]]] = [("shared", VoxelflowSettings)]
    for path in sorted(SERVICES_DIR.glob("*/settings.py")):
        module = importlib.import_module(f"services.{path.parent.name}.settings")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, VoxelflowSettings) and value is not VoxelflowSettings:
                found.append((path.parent.name, value))
    return found


def print_config() -> None:
    shared_fields = set(VoxelflowSettings.model_fields)
    for owner, cls in _settings_classes():
        print(f"# {owner}")
        for name, field in cls.model_fields.items():
            if owner != "shared" and name in shared_fields:
                continue
            default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
            print(f"VOXELFLOW_{name.upper()}  (default: {default!r})\n    {field.description or ''}")
        print()


def tokens(args: argparse.Namespace) -> None:
    from shared.auth import Role, create_token, revoke_token
    from shared.db import models
    from shared.db.base import make_engine, make_session_factory, run_migrations, session_scope

    settings = VoxelflowSettings()
    run_migrations(settings.database_url, models.MIGRATIONS, models.VERSION_TABLE)
    factory = make_session_factory(make_engine(settings.database_url))
    with session_scope(factory) as session:
        if args.action == "create":
            secret = create_token(session, args.name, Role(args.role))
            print(secret)
            print(f"token {args.name!r} ({args.role}) created; it is shown only once", file=sys.stderr)
        elif not revoke_token(session, args.name):
            sys.exit(f"no active token named {args.name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="voxelflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    token_parser = commands.add_parser("tokens", help="create or revoke API tokens")
    token_parser.add_argument("action", choices=["create", "revoke"])
    token_parser.add_argument("--name", required=True)
    token_parser.add_argument("--role", choices=["pacs", "researcher", "operator", "admin"], default="pacs")
    commands.add_parser("config", help="every VOXELFLOW_* variable with its default and description")
    stack_parser = commands.add_parser("stack", help="the local stack (same as python -m shared.stack)")
    stack_parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "tokens":
        tokens(args)
    elif args.command == "config":
        print_config()
    else:
        from shared.stack.__main__ import main as stack_main

        sys.argv = ["voxelflow stack", *args.rest]
        stack_main()


if __name__ == "__main__":
    main()
