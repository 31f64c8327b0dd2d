"""The `layerwatch` command: `serve`, `demo`, and (later) `diagnose` and `webhook test`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

NOT_YET = 2  # exit status of the subcommands that later issues implement


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.main import create_app
    from server.settings import Settings

    try:
        settings = Settings(host=args.host, port=args.port, db_url=args.db, token=args.token, webhooks=args.webhook)
    except ValueError as exc:
        print(f"layerwatch serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"layerwatch dashboard: http://{shown_host}:{settings.port}/  (database {settings.db_url})", flush=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        # Above our own limit, so an oversize batch gets ingest's error message
        # rather than a bare protocol close.
        ws_max_size=settings.max_message_bytes + 1024 * 1024,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from client_hook.demo import main as demo_main  # imports torch: only when asked for

    return demo_main(args.demo_args)


def _not_yet(what: str, issue: int) -> int:
    print(f"layerwatch {what}: not yet implemented (issue {issue})", file=sys.stderr)
    return NOT_YET


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerwatch", description="A live training monitor for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server and dashboard")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    serve.add_argument(
        "--db",
        default=os.environ.get("LAYERWATCH_DB", "sqlite:///./layerwatch.db"),
        help="SQLAlchemy database URL (default: $LAYERWATCH_DB or %(default)s)",
    )
    serve.add_argument("--webhook", action="append", default=[], metavar="URL", help="alert webhook; repeatable")
    serve.add_argument(
        "--token",
        default=os.environ.get("LAYERWATCH_TOKEN"),
        help="require this token from training clients (default: $LAYERWATCH_TOKEN)",
    )
    serve.set_defaults(func=_serve)

    demo = commands.add_parser(
        "demo", help="train a small model with the monitor attached", add_help=False, prefix_chars="\0"
    )
    # Everything after `demo` belongs to the demo's own parser (its --help included).
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)

    diagnose = commands.add_parser("diagnose", help="re-run the diagnosis rules on a stored run")
    diagnose.add_argument("run", help="run id or name")
    diagnose.set_defaults(func=lambda args: _not_yet("diagnose", 3))

    webhook = commands.add_parser("webhook", help="webhook tools")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True)
    webhook_test = webhook_commands.add_parser("test", help="send a test alert to URL")
    webhook_test.add_argument("url")
    webhook_test.set_defaults(func=lambda args: _not_yet("webhook test", 4))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
