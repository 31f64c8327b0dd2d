"""The dashboard in a real Chromium against a real server.

Each test ingests its own run over /ws/ingest (as a training client would),
opens the dashboard, and checks what a user would see: the runs list, the
loss curve, the layer × step heatmaps in forward order, a histogram over
time, live updates without reload, and that user-provided names stay text.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid

from client_hook import wire

LAYERS = [("conv1", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear"), ("head", "Linear")]


# ---------------------------------------------------------------- frame builders


def model(layers: list[tuple[str, str]]) -> dict:
    params = [
        {"name": "weight", "shape": [16, 16], "numel": 256, "requires_grad": True},
        {"name": "bias", "shape": [16], "numel": 16, "requires_grad": True},
    ]
    return {"modules": [{"name": name, "type": type_, "params": params} for name, type_ in layers]}


def run_start(name: str, layers: list[tuple[str, str]] = LAYERS, project: str = "browser-tests") -> tuple:
    return (
        "run_start",
        0,
        {
            "name": name,
            "project": project,
            "time": time.time(),
            "model": model(layers),
            "optimizer": {"type": "SGD", "param_groups": [{"lr": 0.1, "momentum": 0.9}]},
            "config": {"batch_size": 32},
        },
    )


def loss_at(step: int) -> float:
    return 2.3 * math.exp(-step / 12) + 0.15 + 0.05 * math.sin(step)


def scalars(step: int) -> tuple:
    return ("scalars", step, {"values": {"loss": loss_at(step), "lr": 0.1 * 0.97**step}, "time": time.time()})


def stat_row(layer: str, param: str, kind: str, scale: float, update_ratio: float | None, nonfinite: int = 0) -> list:
    numel = 256 if param != "bias" else 16
    row = {
        "mean": 0.01 * scale,
        "std": scale,
        "rms": scale * 1.01,
        "norm": scale * math.sqrt(numel),
        "min": -3 * scale,
        "max": 3 * scale,
        "nonfinite": nonfinite,
        "zero_frac": 0.5 if kind == "activation" else 0.0,
        "numel": numel,
        "update_ratio": update_ratio,
        "sat_frac": None,
    }
    return [layer, param, kind, *(row[c] for c in wire.LAYER_STAT_COLUMNS[3:])]


def layer_stats(step: int, layers: list[tuple[str, str]] = LAYERS, nonfinite_in: str | None = None) -> tuple:
    rows = []
    for i, (layer, _) in enumerate(layers):
        grad_scale = 10 ** (-1 - 0.5 * i) * (1 + 0.3 * math.sin(step / 3 + i))
        for param in ("weight", "bias"):
            rows.append(stat_row(layer, param, "weight", 0.1, 10 ** (-2.5 - 0.4 * i)))
            bad = 3 if (layer == nonfinite_in and param == "weight" and step % 4 == 3) else 0
            rows.append(stat_row(layer, param, "grad", grad_scale, None, nonfinite=bad))
        rows.append(stat_row(layer, wire.ACTIVATION_PARAM, "activation", 1.0 / (i + 1), None))
    return ("layer_stats", step, {"rows": rows, "every": 1})


def gaussian_counts(total: int = 256) -> list[int]:
    centres = [(-3 + 6 * (i + 0.5) / wire.HIST_BINS) for i in range(wire.HIST_BINS)]
    weights = [math.exp(-c * c / 2) for c in centres]
    s = sum(weights)
    return [round(total * w / s) for w in weights]


def histograms(step: int, layers: list[tuple[str, str]] = LAYERS) -> tuple:
    rows = []
    for i, (layer, _) in enumerate(layers):
        sigma = 10 ** (-1 - 0.5 * i) * (1 + 0.3 * math.sin(step / 3 + i))
        rows.append([layer, "weight", "grad", -3 * sigma, 3 * sigma, gaussian_counts()])
        rows.append([layer, "weight", "weight", -0.3, 0.3 + 0.002 * step, gaussian_counts()])
    return ("histograms", step, {"rows": rows})


def training(steps: range, **kw) -> list[tuple]:
    frames = []
    for step in steps:
        frames += [scalars(step), layer_stats(step, **kw), histograms(step, kw.get("layers", LAYERS))]
    return frames


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


def run_url(run_id: str) -> str:
    from urllib.parse import quote

    return f"/#/run/{quote(run_id, safe='')}"


def trace_len(plot_id: str, trace: int = 0) -> str:
    """JS: how many x values the plot's trace has (0 while it is not drawn)."""
    data = f"document.getElementById('{plot_id}').data"
    return f"(() => {{ const d = {data}; return d && d[{trace}] ? d[{trace}].x.length : 0; }})()"


# ---------------------------------------------------------------- tests


def test_runs_list_shows_ingested_run_and_loads_only_from_server(probe, server, client_for):
    run_id = new_run_id()
    client = client_for(run_id)
    client.send([run_start("list-run"), *training(range(5))])

    page = probe.page
    page.goto("/")
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    row.wait_for()
    cells = row.locator("td")
    assert cells.nth(1).text_content() == "list-run"
    assert cells.nth(2).text_content() == "browser-tests"
    assert cells.nth(3).text_content() == "running"
    assert cells.nth(4).text_content() == "4"
    # The loss sparkline: an SVG polyline drawn from the downsampled loss.
    page.wait_for_function(
        f"document.querySelector('tr[data-run-id=\"{run_id}\"] svg.spark polyline')"
        "?.getAttribute('points').split(' ').length === 5"
    )

    assert page.evaluate("typeof window.Plotly") == "object"
    assert any(url.endswith("/static/plotly.min.js") for url in probe.requests)
    foreign = [
        url for url in probe.requests if not (url.startswith(server) or url.startswith(server.replace("http", "ws")))
    ]
    assert foreign == [], f"the dashboard asked for something off the test server: {foreign}"

    # The filter hides what does not match, by project or name.
    page.fill("#run-filter", "no-such-run-xyz")
    row.wait_for(state="detached")
    page.fill("#run-filter", "list-run")
    row.wait_for()

    # A run that starts while the list is open appears without a reload.
    page.fill("#run-filter", "")
    live_id = new_run_id()
    client_for(live_id).send([run_start("appears-live")])
    page.locator(f'tr[data-run-id="{live_id}"]').wait_for(state="attached")

    row.click()
    page.wait_for_function(f"location.hash === {run_url(run_id)[1:]!r}")
    page.wait_for_function("document.getElementById('run-name').textContent === 'list-run'")
    assert probe.errors == []


def test_run_page_draws_loss_heatmaps_and_histogram(probe, client_for):
    run_id = new_run_id()
    steps = 20
    client = client_for(run_id)
    client.send([run_start("page-run"), *training(range(steps), nonfinite_in="fc2")])

    page = probe.page
    page.goto(run_url(run_id))
    page.wait_for_function(f"{trace_len('loss-plot')} === {steps}")
    assert page.locator("#run-status").text_content() == "running"
    assert page.locator("#run-optimizer").text_content() == "SGD · lr 0.1"

    # Gradient norm, one row per layer, in forward order (top to bottom).
    page.click("#run-tabs [data-tab=layers]")
    page.wait_for_function(f"{trace_len('heatmap-main')} === {steps}")
    rows = page.evaluate("document.getElementById('heatmap-main').data[0].y")
    assert rows == [name for name, _ in LAYERS]
    page.wait_for_function(f"{trace_len('heatmap-update')} === {steps}")

    # The stat/kind picker switches the heatmap to the activations' dead fraction.
    page.locator(".preset", has_text="dead fraction").click()
    page.wait_for_function(
        "document.getElementById('heatmap-main').data[0]?.hovertemplate.includes('activation zero_frac')"
    )
    assert page.locator("#heatmap-title").text_content() == "activation zero_frac · layer × step"

    # Histogram over time for a chosen series; its NaN/Inf counts are shown.
    page.click("#run-tabs [data-tab=histograms]")
    page.select_option("#hist-series", label="fc2.weight · grad")
    page.wait_for_function(
        "(() => { const d = document.getElementById('histogram-plot').data;"
        " return d && d[0] && d[0].type === 'heatmap' && d[0].x.length === 20 && d[0].y.length > 0"
        " && d.some(t => t.type === 'bar' && t.y.some(v => v > 0)); })()"
    )
    assert "NaN/Inf in 5 of 20 sampled steps" in page.locator("#hist-nonfinite").text_content()

    # Clicking a heatmap cell opens that layer's histogram at that step.
    page.click("#run-tabs [data-tab=layers]")
    page.locator(".preset", has_text="gradient norm").click()
    page.wait_for_function("document.getElementById('heatmap-main').data[0]?.hovertemplate.includes('grad norm')")
    page.evaluate(
        "document.getElementById('heatmap-main').emit('plotly_click',"
        " {points: [{pointNumber: [0, 3], x: 3, y: 'conv1'}]})"
    )
    page.wait_for_function(
        "document.getElementById('hist-series').selectedOptions[0].textContent === 'conv1.weight · grad'"
    )
    page.wait_for_function("location.hash.includes('tab=histograms') && location.hash.includes('step=3')")
    page.wait_for_function(
        "(() => { const d = document.getElementById('histogram-plot');"
        " return d.layout && d.layout.shapes.length === 1 && d.layout.shapes[0].x0 === 3; })()"
    )

    # The alerts tab lists what the diagnosis engine raised on this data, one row each.
    page.click("#run-tabs [data-tab=alerts]")
    stored = page.evaluate(f"fetch('/api/runs/{run_id}/alerts').then(r => r.json())")
    if stored:
        page.wait_for_function(f"document.querySelectorAll('#alerts-body tr').length === {len(stored)}")
    else:
        assert "No alerts" in page.locator("#alerts-empty").text_content()
    assert probe.errors == []


def test_live_updates_without_reload(probe, client_for):
    run_id = new_run_id()
    client = client_for(run_id)
    client.send([run_start("live-run"), *training(range(3))])

    page = probe.page
    page.goto(run_url(run_id))
    page.wait_for_function(f"{trace_len('loss-plot')} === 3")
    page.wait_for_function("document.getElementById('live-indicator').dataset.state === 'live'")
    page.evaluate("window.__sameDocument = true")

    client.send([scalars(step) for step in range(3, 8)])
    page.wait_for_function(f"{trace_len('loss-plot')} === 8")

    page.click("#run-tabs [data-tab=layers]")
    page.wait_for_function(f"{trace_len('heatmap-main')} === 3")
    client.send([("layer_stats", step, layer_stats(step)[2]) for step in range(3, 8)])
    page.wait_for_function(f"{trace_len('heatmap-main')} === 8")
    page.wait_for_function("document.getElementById('run-step').textContent === '7'")

    # The client's drop counts (its spool overflowed) show as a gap in the record, live.
    assert page.locator("#run-dropped-fact").is_hidden()
    client.send([("heartbeat", 7, {"time": time.time(), "dropped": {"histograms": 12}})])
    page.wait_for_function("document.getElementById('run-dropped').textContent === '12 histograms'")
    assert page.locator("#run-dropped-fact").is_visible()

    client.send([("run_end", 7, {"status": "finished", "time": time.time()})])
    page.wait_for_function("document.getElementById('run-status').textContent === 'finished'")
    page.wait_for_function("document.getElementById('live-indicator').textContent.includes('run finished')")
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    assert probe.errors == []


def test_reconnects_and_catches_up_after_server_restart(tmp_path, client_for, server_factory, page_factory):
    """The live socket comes back by itself, and the page refetches what it missed while away."""
    db = tmp_path / "restart.db"
    run_id = new_run_id()
    state = "document.getElementById('live-indicator').dataset.state"
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(contextlib.ExitStack())
        base = first.enter_context(server_factory(db))
        port = int(base.rsplit(":", 1)[1])
        client = client_for(run_id, base=base)
        client.send([run_start("restart-run"), *training(range(3))])
        probe = stack.enter_context(page_factory(base))
        page = probe.page
        page.goto(run_url(run_id))
        page.wait_for_function(f"{trace_len('loss-plot')} === 3")
        page.wait_for_function(f"{state} === 'live'")

        first.close()  # the server goes away
        page.wait_for_function(f"{state} === 'reconnecting'")
        # Meanwhile the run goes on, through a server elsewhere that shares the database...
        with server_factory(db) as elsewhere:
            client.url = elsewhere.replace("http://", "ws://") + "/ws/ingest"
            client.send([scalars(step) for step in range(3, 8)])
        # ...and when the dashboard's own server is back, it catches up by itself.
        stack.enter_context(server_factory(db, port))
        page.wait_for_function(f"{state} === 'live'", timeout=15_000)
        page.wait_for_function(f"{trace_len('loss-plot')} === 8")
        assert [e for e in probe.errors if "ws/live" not in e] == []


XSS_NAME = '<img src=x onerror="window.__xss=1">'
XSS_LAYER = "<b>bold</b>"


def test_user_names_are_text_not_html(probe, client_for):
    run_id = new_run_id()
    layers = [("conv1", "Conv2d"), (XSS_LAYER, "Linear")]
    client = client_for(run_id)
    client.send(
        [
            run_start(XSS_NAME, layers=layers, project="<script>window.__xss=2</script>"),
            *training(range(4), layers=layers),
        ]
    )

    page = probe.page
    page.goto("/")
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    row.wait_for()
    assert row.locator("td").nth(1).text_content() == XSS_NAME
    assert row.locator("td").nth(2).text_content() == "<script>window.__xss=2</script>"

    page.goto(run_url(run_id) + "?tab=layers")
    page.wait_for_function(f"{trace_len('heatmap-main')} === 4")
    assert page.locator("#run-name").text_content() == XSS_NAME
    options = page.locator("#hist-series option").all_text_contents()
    assert f"{XSS_LAYER}.weight · grad" in options
    # Plotly shows the escaped name literally in the heatmap's row labels.
    ticks = page.locator("#heatmap-main .ytick text").all_text_contents()
    assert XSS_LAYER in ticks, ticks
    page.click("#run-tabs [data-tab=histograms]")
    page.select_option("#hist-series", label=f"{XSS_LAYER}.weight · grad")
    page.wait_for_function(f"{trace_len('histogram-plot')} === 4")

    assert page.evaluate("window.__xss") is None
    assert page.locator("img").count() == 0
    assert page.locator("main b, main script").count() == 0
    assert probe.errors == []


def test_alerts_panel_and_markers(probe, client_for, add_alert):
    run_id = new_run_id()
    client_for(run_id).send([run_start("alert-run"), *training(range(12))])
    add_alert(
        run_id,
        rule="vanishing_gradients",
        severity="warning",
        step=4,
        last_step=9,
        count=6,
        layer="fc2",
        message="Gradient norm of <fc2> fell below 1e-7.",
        remedy="Check the initialisation & activations.",
    )
    add_alert(
        run_id,
        rule="nonfinite_loss",
        severity="critical",
        step=10,
        last_step=10,
        count=1,
        layer=None,
        message="The loss is NaN.",
        remedy="Lower the learning rate.",
    )

    page = probe.page
    page.goto(run_url(run_id))
    page.wait_for_function(f"{trace_len('loss-plot')} === 12")
    # The health summary: one line per rule, naming its layers and since when.
    # (The engine may add rules of its own on this synthetic data: only ours are checked.)
    vanishing = page.locator("#health-list li", has_text="vanishing_gradients")
    vanishing.wait_for()
    assert "since step 4 (last 9)" in vanishing.text_content()
    assert vanishing.locator(".layer-link").text_content() == "fc2"
    # One marker per alert on the loss curve, whose hover holds message and remedy (escaped).
    markers = page.evaluate("document.getElementById('loss-plot').data.find(t => t.name === 'alerts')")
    assert {4, 10} <= set(markers["x"])
    hover = markers["text"][markers["x"].index(4)]
    assert "Gradient norm of &lt;fc2&gt; fell below 1e-7." in hover
    assert "Check the initialisation &amp; activations." in hover

    page.click("#run-tabs [data-tab=alerts]")
    rows = page.locator("#alerts-body tr")
    rows.first.wait_for()
    # Critical first; every field is shown, the user's text literally.
    assert rows.nth(0).locator("td").all_text_contents() == [
        "critical",
        "nonfinite_loss",
        "—",
        "10",
        "10",
        "1",
        "The loss is NaN.",
        "Lower the learning rate.",
    ]
    ours = page.locator("#alerts-body tr", has_text="vanishing_gradients")
    assert ours.locator("td").nth(6).text_content() == "Gradient norm of <fc2> fell below 1e-7."
    assert page.locator("#alerts-empty").is_hidden()
    assert probe.errors == []
