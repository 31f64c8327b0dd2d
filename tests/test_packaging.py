"""Packaging and deployment files: the wheel ships the dashboard; compose and Dockerfile agree."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import tomllib
import yaml
from sqlalchemy.engine import make_url

import client_hook
from layerwatch.server.cli import build_parser
from tests.serving import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out)],
        check=True,
    )
    return next(out.glob("layerwatch-*.whl"))


def _fresh_venv(path: Path) -> Path:
    """A new virtualenv (no system site-packages); its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _serve_and_check_dashboard(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
    """Start `command` (a `layerwatch serve` on a free port) and check / and every static file answer."""
    port = free_port()
    process = subprocess.Popen(
        [*command, "--port", str(port), "--db", f"sqlite:///{cwd}/w.db"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "/static/plotly.min.js" in page.text
        for name in ("app.js", "api.js", "style.css", "plotly.min.js"):
            assert httpx.get(f"{url}/static/{name}").status_code == 200, name
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_wheel_installs_two_top_level_names_and_serves_next_to_web_py(tmp_path: Path) -> None:
    """The wheel in a fresh venv beside the real `web.py` package, run from a folder with a server.py."""
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"layerwatch", "client_hook"}, top_level
    # Every package of the checkout is in the wheel (an editable install would hide a
    # missing one: its finder falls back to the checkout).
    for init in ROOT.glob("*/**/__init__.py"):
        package = init.parent.relative_to(ROOT)
        if package.parts[0] in ("server", "web"):
            package = Path("layerwatch") / package
        if package.parts[0] in ("client_hook", "layerwatch"):
            assert f"{package.as_posix()}/__init__.py" in names, f"{package} is missing from the wheel"
    assert {"layerwatch/web/index.html", "layerwatch/web/style.css", "layerwatch/web/app.js"} <= set(names)

    python = _fresh_venv(tmp_path / "venv")
    # web.py (a real package: its top-level name is `web`) goes in first, then the wheel;
    # the dependencies are the test environment's own, on a path entry after the venv's.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "web.py", str(wheel)], check=True)
    site = _site_packages(python)
    assert (site / "web" / "__init__.py").is_file() and (site / "layerwatch" / "web" / "index.html").is_file()
    (site / "deps.pth").write_text(str(_site_packages(Path(sys.executable))) + "\n")

    work = tmp_path / "work"
    work.mkdir()
    (work / "server.py").write_text("raise SystemExit('the user server.py was imported')\n")
    (work / "web.py").write_text("raise SystemExit('the user web.py was imported')\n")
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import layerwatch, layerwatch.server.main, client_hook, sys; "
            "layerwatch.attach, layerwatch.preflight, layerwatch.Monitor; "
            "print(layerwatch.__version__); print(layerwatch.server.main.__file__); print(client_hook.__file__)",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0] == client_hook.__version__ and all(p.startswith(str(site)) for p in where[1:]), where
    _serve_and_check_dashboard([str(python), "-m", "layerwatch", "serve"], cwd=work)
    _serve_and_check_dashboard([str(python.parent / "layerwatch"), "serve"], cwd=work)


def _dockerfile_steps(text: str) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """The COPY (source, destination) pairs, the RUN commands and the CMD of a Dockerfile."""
    lines: list[str] = []
    for raw in text.splitlines():
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        elif raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    copies = [(source, line.split()[-1]) for line in lines if line.startswith("COPY ") for source in line.split()[1:-1]]
    runs = [line[4:] for line in lines if line.startswith("RUN ")]
    cmd = yaml.safe_load(next(line for line in lines if line.startswith("CMD "))[4:])
    return copies, runs, cmd  # type: ignore[return-value]


def test_dockerfile_install_steps_start_a_server_without_torch(tmp_path: Path) -> None:
    """The Dockerfile's COPY and RUN steps, run in a clean virtualenv: the server starts; torch is absent."""
    copies, runs, cmd = _dockerfile_steps((ROOT / "Dockerfile").read_text())
    app = tmp_path / "app"
    app.mkdir()
    for source, destination in copies:
        # Docker's rules for the two forms used: `COPY a b ./` copies into the folder, `COPY d ./d` names the copy.
        target = app / destination / source if destination.endswith("/") else app / destination
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, target)
    python = _fresh_venv(tmp_path / "venv")
    env = {
        **os.environ,
        "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(python.parent.parent),
    }
    for command in runs:
        subprocess.run(["sh", "-c", command], cwd=app, env=env, check=True)
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0, "torch installed"
    assert subprocess.run([str(python), "-c", "import orjson, psycopg, fastapi, uvicorn"]).returncode == 0
    assert cmd[:2] == ["layerwatch", "serve"]
    # The image's own command with its --port/--db pointed here (the last value of a flag wins).
    work = tmp_path / "work"
    work.mkdir()
    _serve_and_check_dashboard([str(python.parent / cmd[0]), *cmd[1:]], cwd=work, env=env)


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
    for package in ("layerwatch", "client_hook", "server", "web"):
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
    # The image has the driver that URL needs: the [postgres] group, which the Dockerfile installs.
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("psycopg[binary]") for req in groups["postgres"])
    assert "groups['postgres']" in (ROOT / "Dockerfile").read_text()


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
