"""Packaging and deployment files: the wheel ships the dashboard; compose and Dockerfile agree."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy.engine import make_url

from server.cli import build_parser
from tests.serving import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent


def test_installed_copy_serves_the_dashboard(tmp_path: Path) -> None:
    """A built wheel, unpacked outside the checkout, serves / and its static files."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("layerwatch-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Every package of the checkout is in the wheel (an editable install would hide a
    # missing one: its finder falls back to the checkout).
    for init in ROOT.glob("*/**/__init__.py"):
        package = init.parent.relative_to(ROOT)
        if package.parts[0] in ("client_hook", "server", "web"):
            assert (site / package / "__init__.py").is_file(), f"{package} is missing from the wheel"
    web_files = {p.name for p in (site / "web").iterdir()}
    assert {"index.html", "style.css"} <= web_files and any(name.endswith(".js") for name in web_files)

    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import server, web; print(server.__file__); print(web.WEB_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(line.startswith(str(site)) for line in where), where

    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path}/w.db"]
    process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "/static/plotly.min.js" in page.text
        for name in web_files - {"__init__.py", "__pycache__"}:
            assert httpx.get(f"{url}/static/{name}").status_code == 200, name
        assert httpx.get(f"{url}/static/plotly.min.js").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_compose_runs_the_server_on_a_volume_with_the_dockerfile_command() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["server"]
    assert service["build"] == "." and (ROOT / "Dockerfile").is_file()

    args = build_parser().parse_args(service["command"][1:])
    assert service["command"][0] == "layerwatch" and args.command == "serve"
    assert args.host == "0.0.0.0"
    assert service["ports"] == [f"{args.port}:{args.port}"]
    # The SQLite file lives on the named volume, so it survives the container.
    volume, mount = service["volumes"][0].split(":")
    assert volume in compose["volumes"]
    assert args.db == f"sqlite:///{mount}/layerwatch.db"
    assert "/api/health" in " ".join(service["healthcheck"]["test"])

    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd_line = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    assert yaml.safe_load(cmd_line[4:]) == service["command"]
    for package in ("client_hook", "server", "web"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert f'VOLUME ["{mount}"]' in dockerfile


def test_compose_postgres_profile_points_the_server_at_its_database() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, db = compose["services"]["server-pg"], compose["services"]["db"]
    assert server["profiles"] == db["profiles"] == ["postgres"]
    assert server["image"] == compose["services"]["server"]["image"]
    args = build_parser().parse_args(server["command"][1:])
    url = make_url(args.db)
    env = db["environment"]
    # The server's URL names the db service and the credentials it is created with.
    assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "db", 5432)
    credentials = (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert (url.username, url.password, url.database) == credentials
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    assert server["ports"] == [f"{args.port}:{args.port}"]
    assert f"{args.port}/api/health" in " ".join(server["healthcheck"]["test"])
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    # The image has the driver that URL needs.
    assert "psycopg[binary]" in (ROOT / "Dockerfile").read_text()


def test_compose_leaves_the_token_unset_when_the_environment_does(monkeypatch: Any) -> None:
    """Compose passes LAYERWATCH_TOKEN="" when it is not set: that means no token, not a bad one."""
    monkeypatch.setenv("LAYERWATCH_TOKEN", "")
    assert build_parser().parse_args(["serve"]).token is None  # the parser reads the environment when built


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash tests/run.sh"
    assert command in readme and f"exec {command}" in ci
    assert shlex.split(command)[1] == "tests/run.sh" and (ROOT / "tests" / "run.sh").is_file()
