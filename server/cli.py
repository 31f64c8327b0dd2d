"""The `layerwatch` command: `serve`, `demo`, `diagnose` and `webhook test`."""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import signal
import sys
from typing import Any

from client_hook import wire
from layerwatch.server.diagnosis import cli as diagnosis_cli

# On SIGTERM, how long the server waits for batches in flight to commit before it cuts them
# off (a 16 MB batch commits in a few seconds on a slow disk; its client replays it anyway).
SHUTDOWN_GRACE_S = 10


def _env_list(name: str) -> list[str]:
    """A comma-separated environment variable as its non-empty items."""
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from layerwatch.server.auth import exposure_warning
    from layerwatch.server.main import create_app
    from layerwatch.server.settings import Settings, parse_project_tokens

    # --webhook and LAYERWATCH_WEBHOOKS add up; the same URL twice is one webhook.
    from_env = [u.strip() for u in os.environ.get("LAYERWATCH_WEBHOOKS", "").split(",") if u.strip()]
    # --project-token and LAYERWATCH_PROJECT_TOKENS (comma-separated) add up too.
    project_entries = [e for e in os.environ.get("LAYERWATCH_PROJECT_TOKENS", "").split(",") if e.strip()]
    try:
        settings = Settings(
            host=args.host,
            port=args.port,
            db_url=args.db,
            token=args.token,
            project_tokens=parse_project_tokens([*project_entries, *args.project_token]),
            webhooks=list(dict.fromkeys([*args.webhook, *from_env])),
            webhook_secret=os.environ.get("LAYERWATCH_WEBHOOK_SECRET") or None,
            webhook_min_severity=args.webhook_min_severity,
            webhook_retry_for_s=args.webhook_retry_for,
            webhook_rate_limit=args.webhook_rate,
            public_url=args.public_url,
            heartbeat_timeout_s=args.heartbeat_timeout,
            allowed_hosts=[*_env_list("LAYERWATCH_ALLOWED_HOSTS"), *args.allowed_host] or None,
            allow_origins=[*_env_list("LAYERWATCH_ALLOW_ORIGINS"), *args.allow_origin],
            webhook_allow_private=args.webhook_allow_private,
        )
    except ValueError as exc:
        print(f"layerwatch serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = exposure_warning(settings.host, settings.port, settings.token, bool(settings.project_tokens))
    if warning:
        print(f"layerwatch serve: {warning}", file=sys.stderr, flush=True)
    if settings.heartbeat_timeout_s < wire.HEARTBEAT_S:
        print(
            f"layerwatch serve: note: --heartbeat-timeout {settings.heartbeat_timeout_s:g} is shorter than the "
            f"clients' heartbeat interval ({wire.HEARTBEAT_S:g} s): runs that are quiet but alive will flip to "
            "crashed and back",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(settings)
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"layerwatch dashboard: http://{shown_host}:{settings.port}/  (database {settings.db_url})", flush=True)
    _exit_zero_after_sigterm()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        # Above our own limit, so an oversize batch gets ingest's error message
        # rather than a bare protocol close.
        ws_max_size=settings.max_message_bytes + 1024 * 1024,
        # On SIGTERM/Ctrl-C uvicorn stops accepting, closes the websockets (code 1012) and
        # waits this long for the handlers still committing a batch; then the lifespan ends.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        log_config=_uvicorn_log_config(),
    )
    return 0


def _uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging set-up, with access tokens blanked out of the paths it logs."""
    from uvicorn.config import LOGGING_CONFIG

    from layerwatch.server.auth import RedactTokens

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    return config


def _exit_zero_after_sigterm() -> None:
    """Make a SIGTERM'd server exit 0 once uvicorn's graceful shutdown is done.

    uvicorn catches SIGTERM, shuts down, then raises the signal again with the handler that was
    installed before it started, so that the default handler kills the process (exit -15). A
    stop asked for is not a failure: with this no-op handler in place, `serve` returns 0 instead.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def _demo(args: argparse.Namespace) -> int:
    from client_hook.demo import main as demo_main  # imports torch: only when asked for

    return demo_main(args.demo_args)


def _webhook_test(args: argparse.Namespace) -> int:
    from layerwatch.server.settings import Settings, check_webhook_destination
    from layerwatch.server.webhooks import sender
    from layerwatch.server.webhooks.worker import sample_delivery, send

    try:
        check_webhook_destination(args.url, args.allow_private)
    except ValueError as exc:
        print(f"layerwatch webhook test: {exc}", file=sys.stderr)
        return 2
    secret = args.secret or os.environ.get("LAYERWATCH_WEBHOOK_SECRET") or None
    settings = Settings(
        webhook_secret=secret,
        webhook_timeout_s=args.timeout,
        public_url=args.public_url,
        webhook_allow_private=args.allow_private,
    )
    due = sample_delivery(args.url)
    answer: sender.Answer = send(due, settings=settings)
    signed = "signed" if secret else "unsigned"
    if answer.ok:
        print(f"{args.url} answered HTTP {answer.status_code} in {answer.latency_ms:.0f} ms ({signed} test alert)")
        return 0
    print(f"{args.url} did not accept the test alert ({signed}): {answer.error}", file=sys.stderr)
    return 1


def _seconds(text: str) -> float:
    """A positive, finite number of seconds, or argparse's error naming the bad value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, but got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, but got {text!r}")
    return value


def _upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from client_hook.sending.spool import default_spool_dir
    from client_hook.sending.upload import UploadError, run_folders, upload_run

    root = Path(args.path) if args.path else default_spool_dir()
    try:
        folders = run_folders(root)
    except UploadError as exc:
        print(f"layerwatch upload: {exc}", file=sys.stderr)
        return 2
    if not folders:
        print(f"layerwatch upload: nothing to send in {str(root)!r}")
        return 0
    failed = 0
    for folder in folders:
        try:
            done = upload_run(folder, server=args.server, token=args.token)
        except UploadError as exc:
            print(f"layerwatch upload: {exc}", file=sys.stderr)
            failed += 1
            continue
        steps = f" (steps {done.steps[0]}..{done.steps[1]})" if done.steps else ""
        skipped = f"; {done.skipped} unreadable line(s) left out" if done.skipped else ""
        if done.refused:
            skipped += f"; {len(done.refused)} frame(s) refused by the server (the first: {done.refused[0]})"
        print(f"run {done.run_id}: {done.frames} frame(s){steps} delivered to {args.server}{skipped}")
    return 1 if failed else 0


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
        default=os.environ.get("LAYERWATCH_TOKEN") or None,  # compose passes "" when unset
        help="require this access token from training clients, the dashboard and REST (default: $LAYERWATCH_TOKEN)",
    )
    serve.add_argument(
        "--project-token",
        action="append",
        default=[],
        metavar="PROJECT=TOKEN",
        help="a token that reads and sends only PROJECT's runs; repeatable (also $LAYERWATCH_PROJECT_TOKENS, "
        "comma-separated)",
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=_seconds,
        default=os.environ.get("LAYERWATCH_HEARTBEAT_TIMEOUT") or "60",  # "" (unset in compose) too
        metavar="SECONDS",
        help="mark a running run crashed after this long without a frame from it (default %(default)s)",
    )
    serve.add_argument(
        "--webhook-min-severity",
        choices=list(wire.SEVERITIES),
        default=os.environ.get("LAYERWATCH_WEBHOOK_MIN_SEVERITY", "warning"),
        help="the --webhook ones get alerts of this severity and above (default %(default)s)",
    )
    serve.add_argument(
        "--webhook-retry-for",
        type=float,
        default=float(os.environ.get("LAYERWATCH_WEBHOOK_RETRY_FOR", 24 * 3600)),
        metavar="SECONDS",
        help="keep retrying an undelivered alert this long (default %(default)g)",
    )
    serve.add_argument(
        "--webhook-rate",
        type=int,
        default=int(os.environ.get("LAYERWATCH_WEBHOOK_RATE", 30)),
        metavar="N",
        help="at most N requests a minute to one webhook; more wait their turn (default %(default)s)",
    )
    serve.add_argument(
        "--public-url",
        default=os.environ.get("LAYERWATCH_PUBLIC_URL"),
        help="the dashboard's address for links in webhooks (default: http://HOST:PORT)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name requests may name in their Host header (DNS rebinding fails otherwise); repeatable, "
        "'*.example.com' allowed (also $LAYERWATCH_ALLOWED_HOSTS, comma-separated; default: the --host address, "
        "localhost, 127.0.0.1, ::1 and the --public-url host; any host when --host is 0.0.0.0 or ::)",
    )
    serve.add_argument(
        "--webhook-allow-private",
        action="store_true",
        default=os.environ.get("LAYERWATCH_WEBHOOK_ALLOW_PRIVATE", "").strip().lower() in ("1", "true", "yes"),
        help="let webhooks post to loopback, private and link-local addresses (a receiver on this machine or "
        "LAN; also $LAYERWATCH_WEBHOOK_ALLOW_PRIVATE=1): refused otherwise, also for names resolving there",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (http://host:port) besides the dashboard's own whose pages may open the websockets; "
        "repeatable (also $LAYERWATCH_ALLOW_ORIGINS, comma-separated)",
    )
    serve.set_defaults(func=_serve)

    demo = commands.add_parser(
        "demo", help="train a small model with the monitor attached", add_help=False, prefix_chars="\0"
    )
    # Everything after `demo` belongs to the demo's own parser (its --help included).
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)

    diagnose = commands.add_parser("diagnose", help="re-run the diagnosis rules on a stored run")
    diagnosis_cli.add_arguments(diagnose, default_db=os.environ.get("LAYERWATCH_DB", "sqlite:///./layerwatch.db"))
    diagnose.set_defaults(func=diagnosis_cli.run)

    upload = commands.add_parser("upload", help="send the frames a finished training left in its spool")
    upload.add_argument(
        "path",
        nargs="?",
        help="a spool folder or one run's folder (default: $LAYERWATCH_SPOOL_DIR, else ~/.cache/layerwatch/spool)",
    )
    upload.add_argument(
        "--server",
        default=os.environ.get("LAYERWATCH_SERVER", "http://127.0.0.1:8000"),
        help="the server to send to (default: $LAYERWATCH_SERVER or %(default)s)",
    )
    upload.add_argument("--token", default=os.environ.get("LAYERWATCH_TOKEN") or None, help="its access token")
    upload.set_defaults(func=_upload)

    webhook = commands.add_parser("webhook", help="webhook tools")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True)
    webhook_test = webhook_commands.add_parser("test", help="send a test alert to URL")
    webhook_test.add_argument("url")
    webhook_test.add_argument("--secret", help="sign with this secret (default: $LAYERWATCH_WEBHOOK_SECRET)")
    webhook_test.add_argument("--timeout", type=float, default=10.0, help="seconds (default %(default)g)")
    webhook_test.add_argument("--public-url", help="the dashboard address for the sample's link")
    webhook_test.add_argument(
        "--allow-private", action="store_true", help="allow a loopback, private or link-local destination"
    )
    webhook_test.set_defaults(func=_webhook_test)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
