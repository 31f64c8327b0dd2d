#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this): installs what the
# suite needs on a fresh machine, idempotently, then lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests drive Debian's Chromium (never a browser download); the
# store, ingest and API tests also run on a real PostgreSQL server (Debian's).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: the tests need ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' first" >&2
    exit 1
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned to the CPU wheel: left to the project's range, pip would
# pick a CUDA build of several GB.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'

.venv/bin/ruff check .
# pytest exits non-zero on any failure and with 5 when no test ran: both fail this script.
exec .venv/bin/python -m pytest "$@"
