"""The layout's promises, checked: no import circles, all SQL in the store, one definition per word, every
frame kind known everywhere it must be, the dashboard's words generated from the wire schema.

These read the source and run the real modules; nothing is mocked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fastapi.testclient import TestClient

from client_hook import wire
from client_hook.sending import spool
from layerwatch.server import store
from layerwatch.server.main import create_app
from layerwatch.server.routes.web import vocabulary_js
from layerwatch.server.settings import Settings
from tests.reliability.badframes import valid_frames

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the name it is imported by.
PACKAGES = {"layerwatch": "layerwatch", "client_hook": "client_hook", "server": "layerwatch.server"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([name, *parts])] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its text (function-level imports count too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    deps.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_server_has_no_import_circle() -> None:
    graph = _import_graph()
    assert "layerwatch.server.store.alerts" in graph and "layerwatch.server.webhooks.outbox" in graph
    server_cycles = [c for c in _cycles(graph) if any(m.startswith("layerwatch.server") for m in c)]
    assert server_cycles == []
    # Storage never imports the webhooks, the routes or the diagnosis; rules never import storage.
    for name, deps in graph.items():
        if name.startswith("layerwatch.server.store"):
            assert not {d for d in deps if re.match(r"layerwatch\.server\.(webhooks|routes|diagnosis)", d)}, name
        if name.startswith("layerwatch.server.diagnosis.rules."):
            assert not {d for d in deps if d.startswith("layerwatch.server.store")}, name


def _imports_torch(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
    return False


def test_the_client_has_no_import_circle_and_its_threads_stay_apart() -> None:
    """client_hook's layers: the vocabulary (wire, catalog, thresholds) and the sending thread
    know nothing of torch or of training; training never reaches the sender or the monitor;
    preflight checks a model without a monitor. Only monitor.py joins them."""
    graph = _import_graph()
    modules = _modules()
    assert "client_hook.sending.transport" in graph and "client_hook.training.collector" in graph
    assert [c for c in _cycles(graph) if any(m.startswith("client_hook") for m in c)] == []
    vocabulary = {"client_hook.wire", "client_hook.catalog", "client_hook.thresholds"}
    for name, deps in graph.items():
        if name in vocabulary or name.startswith("client_hook.sending"):
            assert not _imports_torch(modules[name]), f"{name} imports torch"
            assert not {d for d in deps if re.match(r"client_hook\.(training|preflight|monitor)", d)}, name
        if name.startswith("client_hook.training"):
            assert not {d for d in deps if re.match(r"client_hook\.(sending|preflight|monitor)", d)}, name
        if name.startswith("client_hook.preflight"):
            assert not {d for d in deps if re.match(r"client_hook\.(sending|monitor)", d)}, name


# SQLAlchemy's statement builders (by the name they are imported under) and the calls that run SQL.
SQL_BUILDERS = {"select", "insert", "update", "delete", "text"}
SQL_RUNNERS = {"execute", "exec_driver_sql"}
# Where the server's SQL lives: the store package, and its one documented exception, the webhooks
# package's own store module (all SQL on the webhook tables; see its docstring and store/__init__.py).
STORAGE = ("server/store/", "server/webhooks/store.py")
# server/db.py's engine setup, by (function, call, what its SQL starts with): each SQLite connection's
# PRAGMAs, and the ALTER TABLE that adds a newer version's columns.
ENGINE_SETUP = {
    ("_sqlite_pragmas", "execute", "PRAGMA "),
    ("_add_missing_columns", "exec_driver_sql", "ALTER TABLE "),
}


def _sql_calls(source: str) -> list[tuple[str | None, int, str, str]]:
    """(enclosing function, line, call, its SQL's leading literal text) of every SQL-building or -running call.

    A builder counts when called by the name `from sqlalchemy... import` bound (under any alias), or
    as an attribute of an imported sqlalchemy module (`sa.select`); `.execute(` and
    `.exec_driver_sql(` count on any object. Strings, comments and `dict.update(...)` do not.
    """
    tree = ast.parse(source)
    builders: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sqlalchemy":
            builders |= {a.asname or a.name for a in node.names if a.name in SQL_BUILDERS}
            modules |= {a.asname or a.name for a in node.names if a.name not in SQL_BUILDERS}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.split(".")[0] == "sqlalchemy"}
    found: list[tuple[str | None, int, str, str]] = []

    def leading_text(call: ast.Call) -> str:
        arg = call.args[0] if call.args else None
        if isinstance(arg, ast.JoinedStr) and arg.values:
            arg = arg.values[0]
        return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            f = node.func
            name = None
            if isinstance(f, ast.Name) and f.id in builders:
                name = f.id
            elif isinstance(f, ast.Attribute) and f.attr in SQL_RUNNERS:
                name = f.attr
            elif isinstance(f, ast.Attribute) and f.attr in SQL_BUILDERS:
                name = f.attr if ast.unparse(f.value).split(".")[0] in modules else None
            if name is not None:
                found.append((function, node.lineno, name, leading_text(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_the_sql_finder_reads_code_not_text() -> None:
    source = """
import sqlalchemy as sa
from sqlalchemy import select as pick, update
# select(Run) in a comment
NOTE = "update(Run).values(...) in a string"

def f(session, state):
    state.update(a=1)
    session.scalars(pick(1))
    sa.text("SELECT 1")
    update(Run)
    session.execute(f"PRAGMA x={1}")
"""
    assert [(fn, call, text) for fn, _, call, text in _sql_calls(source)] == [
        ("f", "pick", ""),
        ("f", "text", "SELECT 1"),
        ("f", "update", ""),
        ("f", "execute", "PRAGMA x="),
    ]


def test_all_sql_is_in_the_store() -> None:
    """Routes -> store -> tables: outside server/store/ (and the webhooks' own store module) no module
    builds or runs SQL; server/db.py's engine setup is allowed by name. Rules import no SQLAlchemy at all."""
    offenders, setup_seen, storage_seen = [], set(), set()
    for path in sorted((ROOT / "server").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        calls = _sql_calls(path.read_text())
        if where.startswith(STORAGE):
            storage_seen |= {where} if calls else set()
            continue
        for function, line, call, text in calls:
            setup = next((s for s in ENGINE_SETUP if s[:2] == (function, call) and text.startswith(s[2])), None)
            if where == "server/db.py" and setup is not None:
                setup_seen.add(setup)
            else:
                offenders.append(f"{where}:{line} {call}(...) in {function or 'the module'}")
        if where.startswith("server/diagnosis/rules/"):
            assert "sqlalchemy" not in {m.split(".")[0] for m in _imported(path)}, where
    assert offenders == [], "SQL outside server/store/: move it into a data function there"
    assert setup_seen == ENGINE_SETUP  # the allowance names calls that exist
    assert {"server/store/runs.py", "server/store/rollup.py", "server/webhooks/store.py"} <= storage_seen
    # The exception stays the webhooks' own: it reads no run table, and storage reads none of its tables.
    assert "layerwatch.server.tables" not in _imported(ROOT / "server" / "webhooks" / "store.py")
    for path in (ROOT / "server" / "store").rglob("*.py"):
        assert "layerwatch.server.webhooks.tables" not in _imported(path), path


def _imported(path: Path) -> set[str]:
    """The modules a file imports from, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_the_server_and_the_layerwatch_package_never_import_torch_at_module_level() -> None:
    for name, path in _modules().items():
        if name.startswith("layerwatch"):
            tree = ast.parse(path.read_text())
            top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
            assert not {n for n in names if n == "torch" or n.startswith("torch.")}, name
            assert not {n for n in names if n in ("client_hook.monitor", "client_hook.preflight")}, name


def test_each_vocabulary_word_is_spelled_once() -> None:
    """Severities and the statistic names are literals in wire.py only; everyone else imports them."""
    severities = re.compile(r"""["']info["'],\s*["']warning["'],\s*["']critical["']""")
    stats = re.compile(r"""["']nonfinite["'],\s*["']zero_frac["']""")
    sources = [*(ROOT / "client_hook").rglob("*.py"), *(ROOT / "server").rglob("*.py"), *(ROOT / "web").glob("*.js")]
    for path in sources:
        text = path.read_text()
        if path != ROOT / "client_hook" / "wire.py":
            assert not severities.search(text), f"{path} spells the severities again"
            assert not stats.search(text), f"{path} spells the statistic names again"
    assert store.SEVERITIES is wire.SEVERITIES and store.HEATMAP_STATS == wire.LAYER_STATS
    assert [wire.severity_rank(s) for s in wire.SEVERITIES] == [0, 1, 2]


def test_the_dashboard_gets_its_words_from_the_server(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path}/v.db")), base_url="http://localhost") as client:
        served = client.get("/static/vocabulary.js")
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/javascript")
    assert served.text == vocabulary_js()
    words = dict(re.findall(r"^export const (\w+) = (.+);$", served.text, re.M))
    assert words["STAT_FIELDS"] == str(list(wire.LAYER_STATS)).replace("'", '"')
    assert words["SEVERITIES"] == '["critical", "warning", "info"]'
    assert words["TENSOR_KINDS"] == str(list(wire.TENSOR_KINDS)).replace("'", '"')
    # Every word the dashboard's modules import from api.js that is the wire's comes from vocabulary.js.
    api = (ROOT / "web" / "api.js").read_text()
    assert 'from "./vocabulary.js"' in api and "export const STAT_FIELDS" not in api
    reexported = set(re.search(r"export \{([^}]*)\} from \"\./vocabulary\.js\"", api)[1].replace(" ", "").split(","))
    assert reexported <= set(words)


def test_every_frame_kind_is_known_in_every_place_that_must_know_it(tmp_path: Path) -> None:
    """wire.py's checklist for a new kind, checked: validation, the spool's drop order, storage, an example."""
    kinds = set(wire.FRAME_KINDS)
    assert set(wire._REQUIRED) == kinds and set(wire._OPTIONAL) == kinds
    assert set(spool.DROP_ORDER) == kinds | {"loss"}
    frames = valid_frames("layout-run")
    assert {f["kind"] for f in frames} == kinds, "tests/reliability/badframes.valid_frames lacks a kind"
    assert wire.validate_batch(wire.batch(frames)) == frames
    from layerwatch.server.db import init_db, make_engine, make_session_factory

    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    init_db(engine)
    with make_session_factory(engine)() as session:
        result = store.ingest_batch(session, frames=frames)
    assert result.stored_frames == len(frames)
