"""``python -m tack``: parse the environment, then run the spindle."""

from __future__ import annotations

import argparse
import sys

from . import __version__, admin, backends, config, logs, service
from .startup import StartupError
from .statuses import FINAL


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
    """The admin commands (``tack.admin``): each reads the database and log
    paths from the same environment as the service and runs beside it."""
    commands = parser.add_subparsers(
        dest="command", metavar="[command]", help="without one, tack runs as the spindle"
    )

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="JSON, for scripts")
        sub.add_argument(
            "--db", help="tack's database (default: SPINDLE_SERVER_DB_PATH, else spindle.db)"
        )
        return sub

    listing = command("workflows", "list workflows, newest first (at most 200)")
    listing.add_argument("--status", choices=sorted(FINAL | {"pending", "running"}))
    listing.add_argument("--repo", help="a repo's name, DID or owner DID")
    listing.add_argument("--days", type=float, help="created in the last N days")
    show = command("show", "one workflow: its statuses, backend state and log tail")
    show.add_argument("id", type=int)
    show.add_argument("--lines", type=int, default=20)
    cancel = command("cancel", "have the running tack cancel a workflow, and wait for it")
    cancel.add_argument("id", type=int)
    cancel.add_argument("--wait", type=float, default=15.0, help="seconds (default 15)")
    command("repos", "the repos this spindle serves records of")
    command("members", "member records naming this spindle")
    command("collaborators", "collaborators, by record and from knots")
    command("knots", "knots of served repos, and whether tack follows them")
    backup = command("backup", "copy the database safely while tack runs")
    backup.add_argument("path")
    prune = command(
        "prune",
        "delete the logs and status events of workflows finished more than "
        "TACK_RETENTION_DAYS ago (the service does it daily)",
    )
    prune.add_argument("--days", type=float, help="instead of TACK_RETENTION_DAYS")


def _run_command(args: argparse.Namespace) -> int:
    handlers = {
        "workflows": lambda: admin.workflows(args.status, args.repo, args.days, args.json),
        "show": lambda: admin.show(paths, args.id, args.lines, args.json),
        "cancel": lambda: admin.cancel(args.id, args.wait, args.json),
        "repos": lambda: admin.repos(args.json),
        "members": lambda: admin.members(args.json),
        "collaborators": lambda: admin.collaborators(args.json),
        "knots": lambda: admin.knots(args.json),
        "backup": lambda: admin.backup(paths, args.path, args.json),
        "prune": lambda: admin.prune(paths, args.days, args.json),
    }
    try:
        paths = admin.connect(args.db)
        return handlers[args.command]()
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
