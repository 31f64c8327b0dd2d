"""The integrations reuse the frameworks suite's real server and readers."""

from tests.frameworks.conftest import server_db, signals, url  # noqa: F401
