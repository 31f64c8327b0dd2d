// One run's page (#/run/<id>?tab=...): header, then tabs — overview (loss with
// alert markers, learning rate, health), layers (heatmaps), histograms,
// alerts, model. Everything shown is in the URL (tab, heatmap, layer, step,
// zoom) and a URL reopens it. Every step plot shares one step range: zooming
// one zooms all, refetches that window at full resolution, and rewrites the URL.

import { api, HttpError, STAT_FIELDS, TENSOR_KINDS, throttle } from "./api.js";
import { formatNumber, purge } from "./charts.js";
import { $, alertCounts, el, hideBanner, setText, showBanner, statusClass } from "./dom.js";
import {
  chosenSeries,
  LAYER_PLOTS,
  loadHistogram,
  loadLayers,
  paramsFor,
  pickSeries,
  PRESETS,
  renderPickers,
  renderSeriesSelect,
  setFrac,
  setHeat,
  wireHeatClicks,
} from "./run_layers.js";
import {
  cancelLiveDraw,
  drawScalars,
  flushLiveDraw,
  liveDraw,
  liveMarkers,
  loadOverview,
  onScalars,
  renderHealth,
  renderKeyChips,
} from "./run_overview.js";
import { hooks, S, seriesKey } from "./run_state.js";
import { loadWebhooks, renderAlerts, renderModel, stopWebhooks } from "./run_tables.js";

/* global Plotly */

export const TABS = ["overview", "layers", "histograms", "alerts", "model"];
const STEP_PLOTS = { overview: ["loss-plot", "lr-plot"], layers: LAYER_PLOTS, histograms: ["histogram-plot"], alerts: [], model: [] };
const ALL_PLOTS = Object.values(STEP_PLOTS).flat();
const DEFAULT_HEAT = { kind: "grad", stat: "norm", param: "weight" };

// ------------------------------------------------------------------ URL

// The URL of what is shown: `#/run/<id>?tab=layers&kind=grad&stat=norm&layer=fc1&step=40&x0=10&x1=90`.
// Defaults are left out, so a plain `#/run/<id>` is the overview of the whole run.
export function runHash() {
  const q = new URLSearchParams();
  if (S.tab !== "overview") q.set("tab", S.tab);
  for (const key of ["kind", "stat", "param"]) if (S.heat[key] !== DEFAULT_HEAT[key]) q.set(key, S.heat[key]);
  if (S.frac !== "zero_frac") q.set("frac", S.frac);
  const chosen = chosenSeries();
  const want = S.want || chosen;
  if (want) {
    q.set("layer", want.layer);
    if (S.tab === "histograms") {
      q.set("hkind", want.kind);
      q.set("hparam", want.param);
    }
  }
  if (S.step !== null) q.set("step", String(S.step));
  if (S.range) {
    q.set("x0", String(S.range[0]));
    q.set("x1", String(S.range[1]));
  }
  const qs = q.toString();
  return `#/run/${encodeURIComponent(S.id)}${qs ? `?${qs}` : ""}`;
}

function writeUrl(push) {
  const hash = runHash();
  if (hash === location.hash) return;
  if (push) history.pushState(null, "", hash);
  else history.replaceState(null, "", hash);
}
hooks.writeUrl = writeUrl;

const num = (v) => (v === null || v === "" || !Number.isFinite(Number(v)) ? null : Number(v));

// The view a URL's query asks for; anything unknown falls back to the default.
function applyParams(params) {
  const tab = params.get("tab");
  S.tab = TABS.includes(tab) ? tab : "overview";
  const kind = params.get("kind");
  const stat = params.get("stat");
  S.heat = {
    kind: TENSOR_KINDS.includes(kind) ? kind : DEFAULT_HEAT.kind,
    stat: STAT_FIELDS.includes(stat) ? stat : DEFAULT_HEAT.stat,
    param: params.has("param") ? params.get("param") : DEFAULT_HEAT.param,
  };
  S.frac = params.get("frac") === "sat_frac" ? "sat_frac" : "zero_frac";
  const layer = params.get("layer");
  S.want = layer === null ? null : { layer, kind: params.get("hkind") || S.heat.kind, param: params.get("hparam") ?? S.heat.param };
  S.step = num(params.get("step"));
  const x0 = num(params.get("x0"));
  const x1 = num(params.get("x1"));
  S.range = x0 !== null && x1 !== null && x1 > x0 ? [x0, x1] : null;
}

// ------------------------------------------------------------------ header and tabs

function renderHeader() {
  const run = S.run;
  setText("run-name", run.name);
  setText("run-project", run.project);
  setText("run-id", run.id);
  const badge = $("run-status");
  badge.className = statusClass(run.status);
  badge.textContent = run.status;
  setText("run-step", run.last_step);
  setText("run-loss", formatNumber(run.last_loss, "—"));
  const opt = run.optimizer;
  if (opt && opt.type) {
    const lrs = [...new Set((opt.param_groups || []).map((g) => g.lr).filter((lr) => lr !== undefined))];
    setText("run-optimizer", lrs.length ? `${opt.type} · lr ${lrs.map(formatNumber).join(", ")}` : opt.type);
  } else {
    setText("run-optimizer", "none given");
  }
  setText("run-every", run.every ? `${run.every} step${run.every === 1 ? "" : "s"}` : null);
  // Shown only when the client had to drop frames: where the record has gaps.
  const dropped = Object.entries(run.dropped || {});
  $("run-dropped-fact").hidden = dropped.length === 0;
  setText("run-dropped", dropped.map(([what, n]) => `${n} ${what}`).join(", "));
  $("run-alert-counts").replaceChildren(alertCounts(run.alert_counts));
  document.title = `${run.name} · layerwatch`;
  const back = el("a", { text: "runs" });
  back.href = "#/";
  $("crumbs").replaceChildren(back, el("span", { className: "sep", text: "/" }), el("span", { text: run.project }), el("span", { className: "sep", text: "/" }), el("span", { text: run.name }));
}

function showTab() {
  for (const button of $("run-tabs").querySelectorAll("[role=tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === S.tab));
  }
  for (const panel of document.querySelectorAll("#view-run .panel[data-tab]")) {
    panel.hidden = panel.dataset.tab !== S.tab;
  }
  const note = $("range-note");
  note.hidden = !S.range || !STEP_PLOTS[S.tab].length;
  if (S.range) $("range-text").textContent = `${S.range[0]}–${S.range[1]}`;
}

// Fetch and draw what the shown tab needs (only it: hidden plots cost nothing).
async function loadTab(gen) {
  showTab();
  if (S.tab === "overview") {
    await loadOverview(gen);
    wireMarkerClicks();
  } else if (S.tab === "layers") {
    renderPickers();
    await loadLayers(gen);
    for (const id of LAYER_PLOTS) wireHeatClicks(id);
  } else if (S.tab === "histograms") {
    renderSeriesSelect();
    await loadHistogram(gen);
  } else if (S.tab === "alerts") renderAlerts();
  else if (S.tab === "model") renderModel();
  if (gen === S.gen) for (const id of STEP_PLOTS[S.tab]) wireRange(id);
}

function switchTab(tab, push = true) {
  if (!TABS.includes(tab)) return;
  for (const id of STEP_PLOTS[S.tab]) purgePlot(id); // drawn again, fresh, when shown again
  S.tab = tab;
  writeUrl(push);
  loadTab(S.gen).catch(failed);
}

// A layer in focus: its histogram, marked at `step` (from a heatmap cell, an
// alert marker, the health summary, the alerts table).
function openLayer(layer, step, { param, kind } = {}) {
  const want = { layer, param: param ?? S.heat.param, kind: kind ?? S.heat.kind };
  S.want = pickSeries(want) || want;
  S.step = step ?? null;
  renderSeriesSelect();
  switchTab("histograms");
}
hooks.openLayer = openLayer;

// ------------------------------------------------------------------ zoom

let syncing = 0;

// One step range for every plot: a zoom anywhere is applied everywhere shown,
// written to the URL, and refetched for that window (the server downsamples a
// whole run; a window comes back at full resolution).
function wireRange(id) {
  const gd = $(id);
  if (!gd || gd.dataset.range || !gd.on) return;
  gd.dataset.range = "1";
  gd.on("plotly_relayout", (ev) => {
    if (syncing) return;
    let range;
    if (ev["xaxis.autorange"]) range = null;
    else if (ev["xaxis.range[0]"] !== undefined) range = [ev["xaxis.range[0]"], ev["xaxis.range[1]"]];
    else if (Array.isArray(ev["xaxis.range"])) range = ev["xaxis.range"];
    else return;
    setRange(range ? [Math.floor(Number(range[0])), Math.ceil(Number(range[1]))] : null, id);
  });
}

function setRange(range, from = null) {
  S.range = range && range[1] > range[0] ? range : null;
  writeUrl(false);
  showTab();
  for (const id of STEP_PLOTS[S.tab]) {
    const gd = $(id);
    if (id === from || !gd.data) continue;
    syncing++;
    const update = S.range ? { "xaxis.range": S.range.slice(), "xaxis.autorange": false } : { "xaxis.autorange": true };
    Promise.resolve(Plotly.relayout(gd, update)).finally(() => syncing--);
  }
  refineSoon();
}

let refineTimer = null;
function refineSoon() {
  clearTimeout(refineTimer);
  const gen = S.gen;
  refineTimer = setTimeout(() => {
    if (gen === S.gen) loadTab(gen).catch(failed);
  }, 300);
}

// ------------------------------------------------------------------ loading

function failed(err) {
  showBanner(`Could not load this run: ${err.message}`);
}

async function refreshRun(gen) {
  const run = await api.run(S.id);
  if (gen !== S.gen) return false;
  const before = JSON.stringify(S.series);
  S.run = { ...S.run, ...run };
  S.series = run.series || [];
  renderHeader();
  if (JSON.stringify(S.series) !== before) {
    renderPickers();
    renderSeriesSelect();
  }
  return true;
}

// Heatmaps or histogram again, after new layer statistics (≤ 1/s, and only the shown tab's).
const refreshLayerViews = throttle(async () => {
  const gen = S.gen;
  if (S.id === null) return;
  try {
    if (!(await refreshRun(gen))) return;
    if (S.tab === "layers") await loadLayers(gen);
    else if (S.tab === "histograms") await loadHistogram(gen);
  } catch (err) {
    if (gen === S.gen) showBanner(`Could not refresh this run: ${err.message}`);
  }
}, 1000);

async function load() {
  const gen = ++S.gen;
  try {
    const run = await api.run(S.id);
    if (gen !== S.gen) return;
    S.run = run;
    S.series = run.series || [];
    const keys = run.scalar_keys || [];
    if (!S.shownKeys.length) {
      S.shownKeys = keys.includes("loss") ? ["loss"] : keys.slice(0, 1);
      // Validation loss belongs on the same axes as the loss.
      for (const k of keys) if (/^val_?loss$/i.test(k)) S.shownKeys.push(k);
    }
    S.shownKeys = S.shownKeys.filter((k) => keys.includes(k));
    S.scalars = {};
    $("run-body").hidden = false; // before drawing: Plotly sizes plots from their container
    $("run-missing").hidden = true;
    renderHeader();
    renderKeyChips();
    renderPickers();
    renderSeriesSelect();
    hideBanner();
    const fetched = await api.alerts(S.id);
    if (gen !== S.gen) return;
    // Alerts heard live while the list was being fetched may be newer than it (or missing from it).
    S.alerts = mergeAlerts(fetched, S.alerts);
    renderAlerts();
    renderHealth();
    loadWebhooks(gen);
    await loadTab(gen);
  } catch (err) {
    if (gen !== S.gen) return;
    const missing = err instanceof HttpError && / 404/.test(err.message);
    if (missing && !S.run) $("run-missing").hidden = false;
    showBanner(missing ? `There is no run with id ${S.id}.` : `Could not load this run: ${err.message}`);
  }
}

// The fetched alerts, with any heard live that are missing from them or seen more often since.
function mergeAlerts(fetched, live) {
  const byId = new Map(fetched.map((a) => [a.id, a]));
  for (const a of live) {
    const known = byId.get(a.id);
    if (!known || (a.count ?? 1) > (known.count ?? 1)) byId.set(a.id, a);
  }
  return [...byId.values()];
}

function onAlert(alert) {
  const i = S.alerts.findIndex((a) => a.id === alert.id);
  if (i >= 0) S.alerts[i] = alert;
  else S.alerts.push(alert);
  // Heard before the run itself has loaded: kept, and drawn by load() (mergeAlerts), which draws everything.
  if (!S.run) return;
  if (i < 0) {
    const counts = (S.run.alert_counts = { info: 0, warning: 0, critical: 0, ...S.run.alert_counts });
    counts[alert.severity] = (counts[alert.severity] || 0) + 1;
    liveDraw("header", renderHeader);
    liveMarkers(); // a repeat only updates its row: its marker stays at its first step
  }
  // A rule that keeps firing repeats its alert every batch: drawn with the next live draw, not each time.
  liveDraw("alerts", () => {
    renderAlerts();
    renderHealth();
    if (S.tab === "model") renderModel();
    loadWebhooks(S.gen);
  });
}

// A click on an alert marker on the loss: the layer it names, at its step.
function wireMarkerClicks() {
  const gd = $("loss-plot");
  if (gd.dataset.clicks || !gd.on) return;
  gd.dataset.clicks = "1";
  gd.on("plotly_click", (event) => {
    const point = event.points && event.points[0];
    if (!point || point.data.name !== "alerts") return;
    const alert = S.alerts[point.customdata];
    if (!alert) return;
    if (alert.layer) openLayer(alert.layer, alert.step);
    else switchTab("alerts");
  });
}

let wired = false;

function wireControls() {
  if (wired) return;
  wired = true;
  $("heat-kind").addEventListener("change", (e) => setHeat({ kind: e.target.value }));
  $("heat-stat").addEventListener("change", (e) => setHeat({ stat: e.target.value }));
  $("heat-param").addEventListener("change", (e) => setHeat({ param: e.target.value }));
  $("frac-stat").addEventListener("change", (e) => setFrac(e.target.value));
  $("hist-series").addEventListener("change", (e) => {
    S.seriesKey = e.target.value;
    S.want = chosenSeries();
    writeUrl(false);
    loadHistogram(S.gen);
  });
  $("loss-log").addEventListener("change", drawScalars);
  $("range-reset").addEventListener("click", () => setRange(null));
  for (const button of $("run-tabs").querySelectorAll("[role=tab]")) {
    button.addEventListener("click", () => switchTab(button.dataset.tab));
  }
  $("heat-presets").replaceChildren(
    ...PRESETS.map((p, i) => {
      const button = el("button", { className: "preset", text: p.label });
      button.type = "button";
      button.dataset.preset = String(i);
      button.addEventListener("click", () => setHeat({ kind: p.kind, stat: p.stat, param: p.param }));
      return button;
    }),
  );
}

// Plotly.purge drops the plot's event handlers too: they are wired again on the next draw.
function purgePlot(id) {
  purge($(id));
  delete $(id).dataset.range;
  delete $(id).dataset.clicks;
}

function clearPlots() {
  cancelLiveDraw();
  for (const id of ALL_PLOTS) purgePlot(id);
}

export const runView = {
  enter(id, params = new URLSearchParams()) {
    wireControls();
    S.id = id;
    S.run = null;
    S.shownKeys = [];
    S.alerts = [];
    S.webhooks = {};
    S.seriesKey = null;
    S.heatData = {};
    applyParams(params);
    for (const name of ["run-name", "run-project", "run-step", "run-loss", "run-optimizer", "run-every"]) setText(name, "");
    $("run-id").textContent = id;
    $("crumbs").replaceChildren();
    $("run-body").hidden = true;
    $("run-missing").hidden = true;
    $("view-run").hidden = false;
    showTab();
    return load();
  },

  // The same run, another view of it (back/forward, an edited URL).
  apply(params) {
    for (const id of STEP_PLOTS[S.tab]) purgePlot(id);
    applyParams(params);
    if (S.want) S.seriesKey = null;
    renderPickers();
    renderSeriesSelect();
    return loadTab(S.gen);
  },

  id() {
    return S.id;
  },

  leave() {
    S.gen++;
    S.id = null;
    stopWebhooks();
    $("view-run").hidden = true;
    clearPlots();
    document.title = "layerwatch";
  },

  // After a reconnect, a resume, a theme change: fetch everything again; live events resume from there.
  refresh() {
    if (S.id === null) return;
    clearPlots();
    return load();
  },

  status() {
    return S.run ? S.run.status : null;
  },

  // Pausing: what arrived before the click is drawn now, nothing after it.
  pause() {
    if (S.id !== null && S.run) flushLiveDraw();
  },

  onEvent(event) {
    if (S.id === null) return;
    if (!S.run) {
      // Opened before the run existed (or while it was loading): load it once it starts.
      if (event.type === "run" && event.run && String(event.run.id) === String(S.id)) load();
      return;
    }
    if (event.type === "run" && event.run && String(event.run.id) === String(S.id)) {
      const wasRunning = S.run.status === "running";
      S.run = { ...S.run, ...event.run };
      renderHeader();
      // The run ended: one last refresh picks up its final statistics.
      if (wasRunning && S.run.status !== "running") refreshLayerViews();
      return;
    }
    if (String(event.run_id) !== String(S.id)) return;
    if (event.type === "scalars") onScalars(event, renderHeader);
    else if (event.type === "layer_stats") refreshLayerViews();
    else if (event.type === "alert" && event.alert) onAlert(event.alert);
  },
};

export { paramsFor, seriesKey };
