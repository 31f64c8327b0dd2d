"""The layout's promises, checked: no import circles, one definition per word, every frame kind known
everywhere it must be, the dashboard's words generated from the wire schema.

These read the source and run the real modules; nothing is mocked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fastapi.testclient import TestClient

from client_hook import spool, wire
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
    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path}/v.db"))) as client:
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
