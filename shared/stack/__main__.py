"""Command line of the local stack.

``python -m shared.stack up [--only a,b] [--with-services] | down [--purge] | status | env``

Whatever a user can get wrong (a binary not installed, a port taken, the stack not up) ends in one line on
stderr that says what is wrong and what to do, and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.stack.manager import INFRA, Stack, StackConfig, check_base_port
from shared.stack.process import StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.stack", description=__doc__)
    parser.add_argument("--state-dir", type=Path, help="default: $VOXELFLOW_STACK_DIR or .voxelflow/stack")
    parser.add_argument("--base-port", type=int, help="default: $VOXELFLOW_STACK_BASE_PORT or 17000")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack (skips what is already healthy), write stack.env")
    up.add_argument("--only", help="comma-separated components, e.g. postgres,redis,s3 (requirements follow)")
    up.add_argument("--with-services", action="store_true", help="also start voxelflow's own services")
    down = sub.add_parser("down", help="stop everything this stack started")
    down.add_argument("--purge", action="store_true", help="also delete the state directory (all data)")
    sub.add_parser("status", help="each component with its URL and state")
    sub.add_parser("env", help="print stack.env (the VOXELFLOW_* variables)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except StackError as exc:
        # the first line says what is wrong and what to do; a crash adds its log's last lines below it
        print(f"voxelflow stack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("voxelflow stack: interrupted (`make down` stops what was started)", file=sys.stderr)
        return 130


def not_up(stack: Stack, why: str) -> StackError:
    port = stack.config.base_port
    return StackError(f"the stack is not up ({why}; state {stack.state_dir}, base port {port}); start it: make up")


def run(args: argparse.Namespace) -> int:
    config = StackConfig.from_env()
    if args.state_dir:
        config.state_dir = args.state_dir
    if args.base_port is not None:
        config.base_port = check_base_port(args.base_port)
    stack = Stack(config)
    if args.command == "up":
        stack.up(only=args.only.split(",") if args.only else None, with_services=args.with_services)
        print(f"stack is up; environment in {stack.env_file}:")
        print(stack.env_file.read_text(), end="")
        if "VOXELFLOW_MLFLOW_TRACKING_URI" in stack.env_file.read_text():
            print(f"MLflow UI: {stack.mlflow_uri}")
    elif args.command == "down":
        stack.down(purge=args.purge)
        print("stack is down")
    elif args.command == "status":
        rows = stack.status()
        if all(state == "stopped" for _, state, _ in rows):
            raise not_up(stack, "no component runs")
        width = max(len(name) for name, _, _ in rows)
        for name, state, url in rows:
            print(f"{name:<{width}}  {state:<24}  {url}")
    elif args.command == "env":
        if not stack.env_file.exists():
            raise not_up(stack, f"no {stack.env_file}")
        if not any(stack.components[name].health() for name in INFRA):
            raise not_up(stack, f"{stack.env_file} is left from a stack that no longer runs")
        print(stack.env_file.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
