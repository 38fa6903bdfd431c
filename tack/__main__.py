"""``python -m tack``: parse the environment, then run the spindle."""

from __future__ import annotations

import argparse
import sys

from . import __version__, admin, backends, config, logs, service
from .startup import StartupError


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="tack",
        description=(
            "tack is a Tangled spindle: it watches the AT Protocol for repos that name it, "
            "reads their workflows when a knot announces a push (or a pull request or a "
            "manual run asks), runs them on a configured backend and "
            "reports statuses and logs back to Tangled. It is configured entirely by "
            "environment variables."
        ),
        epilog="settings (environment variables):\n" + config.describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(
        dest="command", metavar="command", help="without one, tack runs as the spindle"
    )
    prune = commands.add_parser(
        "prune",
        help="delete the logs and status events of workflows finished more than "
        "TACK_RETENTION_DAYS ago (the service does it daily)",
    )
    prune.add_argument("--days", type=float, help="instead of TACK_RETENTION_DAYS")
    prune.add_argument("--json", action="store_true", help="one JSON object, for scripts")


def _run_command(args: argparse.Namespace) -> int:
    try:
        return admin.prune(args.days, args.json)
    except (config.ConfigError, StartupError) as exc:
        print(f"tack: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    parser.add_argument("--version", action="version", version=f"tack {__version__}")
    _commands(parser)
    args = parser.parse_args(argv)
    if args.command is not None:
        return _run_command(args)
    try:
        settings = config.load()
        context = backends.Context.for_config(settings)
        configured = backends.load(settings.config_file, context)
    except config.ConfigError as exc:
        print(f"tack: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    try:
        return service.run(settings, configured, context)
    except StartupError as exc:  # the port, the database lock, the files
        print(f"tack: start-up error: {exc}", file=sys.stderr)
        return 2
    except config.ConfigError as exc:  # found while opening (e.g. the secrets key)
        print(f"tack: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
