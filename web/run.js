// One run's page (#/run/<id>): header, loss with alert markers, layer × step
// heatmaps, a histogram over time for one series, and the alerts table.
// Live events extend the loss at once; heatmaps and histograms are refetched
// at most once a second while layer statistics arrive.

import { ACTIVATION_PARAM, api, HttpError, SEVERITIES, STAT_FIELDS, TENSOR_KINDS, throttle } from "./api.js";
import {
  formatNumber,
  LOG_STATS,
  purge,
  renderHeatmap,
  renderHistogram,
  renderScalars,
  UPDATE_RATIO_GUIDE,
} from "./charts.js";
import { $, alertCounts, el, hideBanner, setText, severityBadge, showBanner, statusClass } from "./dom.js";

/* global Plotly */

const PRESETS = [
  { label: "gradient norm", kind: "grad", stat: "norm", param: "weight" },
  { label: "activation std", kind: "activation", stat: "std", param: ACTIVATION_PARAM },
  { label: "dead fraction", kind: "activation", stat: "zero_frac", param: ACTIVATION_PARAM },
  { label: "weight rms", kind: "weight", stat: "rms", param: "weight" },
  { label: "NaN/Inf in grads", kind: "grad", stat: "nonfinite", param: "" },
];

const PLOTS = ["loss-plot", "heatmap-main", "heatmap-update", "histogram-plot"];

// Everything the page knows about the shown run. `gen` increases on every
// (re)load so a late answer for an earlier one is dropped.
const S = {
  id: null,
  gen: 0,
  run: null,
  scalars: {}, // key -> {steps, values, loading, pending}
  shownKeys: [],
  alerts: [],
  webhooks: {}, // alert id -> {state, delivered, pending, failed}; empty: no webhook column
  heat: { kind: "grad", stat: "norm", param: "weight" },
  heatData: null,
  updateData: null,
  series: [],
  seriesKey: null, // "layer\u0000param\u0000kind" of the chosen histogram series
};

export const seriesKey = (s) => `${s.layer}\u0000${s.param}\u0000${s.kind}`;

// ------------------------------------------------------------------ header

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
  $("run-alert-counts").replaceChildren(alertCounts(run.alert_counts));
  document.title = `${run.name} · layerwatch`;
  const crumbs = $("crumbs");
  const back = el("a", { text: "runs" });
  back.href = "#/";
  crumbs.replaceChildren(back, el("span", { className: "sep", text: "/" }), el("span", { text: run.project }), el("span", { className: "sep", text: "/" }), el("span", { text: run.name }));
}

// ------------------------------------------------------------------ scalars

function orderedKeys(keys) {
  const list = [...keys];
  list.sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : 0));
  return list;
}

function renderKeyChips() {
  const box = $("scalar-keys");
  const chips = orderedKeys(S.run.scalar_keys || []).map((key) => {
    const input = el("input");
    input.type = "checkbox";
    input.checked = S.shownKeys.includes(key);
    input.addEventListener("change", () => toggleKey(key, input.checked));
    return el("label", { className: "chip" }, input, el("span", { text: key }));
  });
  box.replaceChildren(...chips);
}

async function toggleKey(key, on) {
  const keys = new Set(S.shownKeys);
  if (on) keys.add(key);
  else keys.delete(key);
  S.shownKeys = orderedKeys(S.run.scalar_keys.filter((k) => keys.has(k)));
  const gen = S.gen;
  if (on && !S.scalars[key]) await loadScalarKey(key, gen);
  if (gen === S.gen) drawScalars();
}

// Only points after the last one held are appended: an event may repeat
// what a fetch already returned.
function appendPoints(entry, steps, values) {
  const last = entry.steps.length ? entry.steps[entry.steps.length - 1] : -Infinity;
  const added = { steps: [], values: [] };
  steps.forEach((step, i) => {
    if (step > last) {
      added.steps.push(step);
      added.values.push(values[i]);
    }
  });
  entry.steps.push(...added.steps);
  entry.values.push(...added.values);
  return added;
}

async function loadScalarKey(key, gen) {
  const entry = { steps: [], values: [], loading: true, pending: [] };
  S.scalars[key] = entry;
  const data = await api.scalars(S.id, key);
  if (gen !== S.gen || S.scalars[key] !== entry) return;
  entry.steps = data.steps.slice();
  entry.values = data.values.slice();
  entry.loading = false;
  // Events that arrived while the fetch was in flight.
  for (const event of entry.pending) appendPoints(entry, event.steps, event.values);
  entry.pending = [];
}

function drawScalars() {
  renderScalars($("loss-plot"), { scalars: S.scalars, keys: S.shownKeys, alerts: S.alerts, logY: $("loss-log").checked });
}

function onScalars(event) {
  const keys = S.run.scalar_keys || (S.run.scalar_keys = []);
  if (!keys.includes(event.key)) {
    keys.push(event.key);
    if (!S.shownKeys.length && event.key === "loss") S.shownKeys = ["loss"];
    renderKeyChips();
  }
  if (event.steps.length) {
    S.run.last_step = Math.max(S.run.last_step ?? 0, ...event.steps);
    if (event.key === "loss") S.run.last_loss = event.values[event.values.length - 1];
    renderHeader();
  }
  let entry = S.scalars[event.key];
  if (!entry) {
    if (!S.shownKeys.includes(event.key)) return;
    entry = S.scalars[event.key] = { steps: [], values: [], loading: false, pending: [] };
  }
  if (entry.loading) {
    entry.pending.push(event);
    return;
  }
  const before = entry.steps.length;
  const added = appendPoints(entry, event.steps, event.values);
  const index = S.shownKeys.indexOf(event.key);
  if (!added.steps.length || index < 0) return;
  const gd = $("loss-plot");
  if (before > 0 && gd.data && gd.data[index] && gd.data[index].x.length === before) {
    Plotly.extendTraces(gd, { x: [added.steps], y: [added.values] }, [index]);
  } else {
    drawScalars(); // first points, or the plot and our arrays disagree: redraw
  }
}

// ------------------------------------------------------------------ heatmaps

function heatOptions(kind, stat) {
  const log = LOG_STATS.has(stat);
  const options = { log, title: `${kind}<br>${stat}${log ? "<br>(log10)" : ""}`, empty: `No ${kind} ${stat} recorded yet` };
  if (stat === "zero_frac") Object.assign(options, { zmin: 0, zmax: 1, title: `${kind}<br>zero_frac<br>(dead)` });
  if (stat === "mean") Object.assign(options, { colorscale: "RdBu", zmid: 0 });
  if (stat === "nonfinite") Object.assign(options, { colorscale: [[0, "#1c2128"], [1, "#f85149"]], title: `${kind}<br>nonfinite<br>(NaN/Inf)` });
  return options;
}

function paramsFor(kind) {
  return [...new Set(S.series.filter((s) => s.kind === kind).map((s) => s.param))];
}

function fillSelect(select, values, labelOf = (v) => v) {
  const current = select.value;
  select.replaceChildren(...values.map((v) => el("option", { text: labelOf(v) })));
  values.forEach((v, i) => {
    select.options[i].value = v;
  });
  return current;
}

function renderPickers() {
  fillSelect($("heat-kind"), TENSOR_KINDS);
  fillSelect($("heat-stat"), STAT_FIELDS);
  const params = paramsFor(S.heat.kind);
  fillSelect($("heat-param"), ["", ...params], (p) => (p === "" ? "all" : p));
  if (S.heat.param && !params.includes(S.heat.param) && params.length) S.heat.param = params[0];
  $("heat-kind").value = S.heat.kind;
  $("heat-stat").value = S.heat.stat;
  $("heat-param").value = params.includes(S.heat.param) ? S.heat.param : "";
  $("heatmap-title").textContent = `${S.heat.kind} ${S.heat.stat} · layer × step`;
  for (const button of $("heat-presets").children) {
    const p = PRESETS[Number(button.dataset.preset)];
    button.classList.toggle("on", p.kind === S.heat.kind && p.stat === S.heat.stat);
  }
}

function setHeat(change) {
  Object.assign(S.heat, change);
  if (change.kind && change.param === undefined) {
    const params = paramsFor(change.kind);
    const preferred = change.kind === "activation" ? ACTIVATION_PARAM : "weight";
    S.heat.param = params.includes(preferred) ? preferred : "";
  }
  renderPickers();
  loadMainHeatmap(S.gen);
}

async function loadMainHeatmap(gen) {
  const { kind, stat, param } = S.heat;
  const heat = await api.heatmap(S.id, { kind, stat, param });
  if (gen !== S.gen || kind !== S.heat.kind || stat !== S.heat.stat || param !== S.heat.param) return;
  S.heatData = heat;
  await renderHeatmap($("heatmap-main"), heat, heatOptions(kind, stat));
  wireClicks("heatmap-main", () => S.heatData);
}

async function loadUpdateHeatmap(gen) {
  const params = paramsFor("weight");
  const heat = await api.heatmap(S.id, { kind: "weight", stat: "update_ratio", param: params.includes("weight") ? "weight" : "" });
  if (gen !== S.gen) return;
  S.updateData = heat;
  // Fixed range 1e-6 .. 1 centred on the 1e-3 guide, so colours mean the same at every step.
  await renderHeatmap($("heatmap-update"), heat, {
    log: true,
    zmin: -6,
    zmax: 0,
    zmid: Math.log10(UPDATE_RATIO_GUIDE),
    colorscale: [
      [0, "#2f6fde"],
      [0.5, "#3fb950"],
      [1, "#f85149"],
    ],
    guide: UPDATE_RATIO_GUIDE,
    title: "update_ratio<br>(log10)",
    empty: "No update ratios yet (they need an optimizer)",
  });
  wireClicks("heatmap-update", () => S.updateData);
}

// Clicking a heatmap cell shows that row's series in the histogram view.
function wireClicks(id, data) {
  const gd = $(id);
  if (gd.dataset.wired) return;
  gd.dataset.wired = "1";
  gd.on("plotly_click", (event) => {
    const point = event.points && event.points[0];
    const heat = data();
    if (!point || !heat) return;
    const row = Array.isArray(point.pointNumber) ? point.pointNumber[0] : point.pointIndex?.[0];
    if (row === undefined || !heat.layers[row]) return;
    selectSeries({ layer: heat.layers[row], param: heat.params[row], kind: heat.kind });
    $("histogram-plot").scrollIntoView({ behavior: "smooth", block: "center" });
  });
}

// ------------------------------------------------------------------ histograms

function seriesLabel(s) {
  return `${s.layer}.${s.param} · ${s.kind}`;
}

function renderSeriesSelect() {
  const select = $("hist-series");
  const keys = S.series.map(seriesKey);
  select.replaceChildren(...S.series.map((s) => el("option", { text: seriesLabel(s) })));
  keys.forEach((k, i) => {
    select.options[i].value = k;
  });
  if (!keys.includes(S.seriesKey)) {
    const first = S.series.find((s) => s.kind === "grad" && s.param === "weight") || S.series[0];
    S.seriesKey = first ? seriesKey(first) : null;
  }
  if (S.seriesKey) select.value = S.seriesKey;
}

function selectSeries(wanted) {
  const exact = S.series.find((s) => seriesKey(s) === seriesKey(wanted));
  const sameLayer = exact || S.series.find((s) => s.layer === wanted.layer && s.kind === wanted.kind) || S.series.find((s) => s.layer === wanted.layer);
  if (!sameLayer) return;
  S.seriesKey = seriesKey(sameLayer);
  $("hist-series").value = S.seriesKey;
  loadHistogram(S.gen);
}

function describeNonfinite(stats) {
  const hint = $("hist-nonfinite");
  if (!stats || !stats.steps.length) {
    hint.textContent = "";
    hint.className = "hint";
    return;
  }
  const bad = stats.steps.map((step, i) => [step, stats.nonfinite[i] ?? 0]).filter(([, n]) => n > 0);
  if (!bad.length) {
    hint.textContent = `No NaN/Inf in this series in ${stats.steps.length} sampled steps (red bars above the histogram would show them).`;
    hint.className = "hint";
  } else {
    const worst = Math.max(...bad.map(([, n]) => n));
    hint.textContent = `NaN/Inf in ${bad.length} of ${stats.steps.length} sampled steps, first at step ${bad[0][0]}, up to ${worst} elements — shown as red bars; the histogram counts finite values only.`;
    hint.className = "hint bad";
  }
}

async function loadHistogram(gen) {
  const chosen = S.series.find((s) => seriesKey(s) === S.seriesKey);
  if (!chosen) {
    describeNonfinite(null);
    await renderHistogram($("histogram-plot"), null, null, "");
    return;
  }
  const query = { layer: chosen.layer, param: chosen.param, kind: chosen.kind };
  const [hist, stats] = await Promise.all([
    api.histograms(S.id, query).catch((err) => (err instanceof HttpError ? null : Promise.reject(err))),
    api.layerStats(S.id, query).catch((err) => (err instanceof HttpError ? null : Promise.reject(err))),
  ]);
  if (gen !== S.gen || S.seriesKey !== seriesKey(chosen)) return;
  describeNonfinite(stats);
  await renderHistogram($("histogram-plot"), hist, stats, `${chosen.layer}.${chosen.param} (${chosen.kind})`);
}

// ------------------------------------------------------------------ alerts

const SEVERITY_RANK = Object.fromEntries(SEVERITIES.map((s, i) => [s, i]));

// The webhook column shows only where some alert of this run has deliveries.
function webhookCell(summary) {
  if (!summary) return el("td", { className: "mono", text: "—", title: "not sent: below every webhook's minimum severity" });
  const title = `${summary.delivered} delivered · ${summary.pending} pending · ${summary.failed} failed`;
  return el("td", { className: `mono webhook-${summary.state}`, text: summary.state, title });
}

let webhookTimer = null;

// Delivery states come from /api/webhooks/summary; while any is pending, look again every 2 s.
async function loadWebhooks(gen) {
  clearTimeout(webhookTimer);
  let summary = [];
  try {
    const response = await fetch(`/api/webhooks/summary?run_id=${encodeURIComponent(S.id)}`);
    if (response.ok) summary = await response.json();
  } catch {
    /* an extra column: the table is whole without it */
  }
  if (gen !== S.gen) return;
  S.webhooks = Object.fromEntries(summary.map((s) => [s.alert_id, s]));
  renderAlerts();
  if (summary.some((s) => s.state === "pending")) webhookTimer = setTimeout(() => loadWebhooks(gen), 2000);
}

function renderAlerts() {
  const showHooks = Object.keys(S.webhooks).length > 0;
  const alerts = S.alerts
    .slice()
    .sort((a, b) => (SEVERITY_RANK[a.severity] ?? 9) - (SEVERITY_RANK[b.severity] ?? 9) || a.step - b.step);
  const rows = alerts.map((a) =>
    el(
      "tr",
      { className: `sev-row-${SEVERITIES.includes(a.severity) ? a.severity : "unknown"}` },
      el("td", {}, severityBadge(a.severity)),
      el("td", { className: "mono", text: a.rule }),
      el("td", { className: "mono", text: a.layer ?? "—" }),
      el("td", { className: "num mono", text: a.step }),
      el("td", { className: "num mono", text: a.last_step ?? a.step }),
      el("td", { className: "num mono", text: a.count ?? 1 }),
      el("td", { text: a.message }),
      el("td", { className: "remedy", text: a.remedy ?? "" }),
      showHooks ? webhookCell(S.webhooks[a.id]) : null,
    ),
  );
  const head = $("alerts-table").tHead.rows[0];
  const th = head.querySelector(".webhook-col");
  if (showHooks && !th) head.append(el("th", { className: "webhook-col", text: "webhook" }));
  if (!showHooks && th) th.remove();
  $("alerts-body").replaceChildren(...rows);
  $("alerts-table").hidden = rows.length === 0;
  $("alerts-empty").hidden = rows.length > 0;
}

function onAlert(alert) {
  const i = S.alerts.findIndex((a) => a.id === alert.id);
  if (i >= 0) S.alerts[i] = alert;
  else {
    S.alerts.push(alert);
    const counts = (S.run.alert_counts = { info: 0, warning: 0, critical: 0, ...S.run.alert_counts });
    counts[alert.severity] = (counts[alert.severity] || 0) + 1;
    renderHeader();
  }
  renderAlerts();
  drawScalars();
  loadWebhooks(S.gen);
}

// ------------------------------------------------------------------ loading

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

// Heatmaps and histogram again, after new layer statistics (≤ 1/s).
const refreshLayerViews = throttle(async () => {
  const gen = S.gen;
  if (S.id === null) return;
  try {
    if (!(await refreshRun(gen))) return;
    await Promise.all([loadMainHeatmap(gen), loadUpdateHeatmap(gen), loadHistogram(gen)]);
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
    if (!S.shownKeys.length) S.shownKeys = keys.includes("loss") ? ["loss"] : keys.slice(0, 1);
    S.shownKeys = S.shownKeys.filter((k) => keys.includes(k));
    S.scalars = {};
    $("run-body").hidden = false; // before drawing: Plotly sizes plots from their container
    $("run-missing").hidden = true;
    renderHeader();
    renderKeyChips();
    renderPickers();
    renderSeriesSelect();
    hideBanner();
    const [alerts] = await Promise.all([api.alerts(S.id), ...S.shownKeys.map((k) => loadScalarKey(k, gen))]);
    if (gen !== S.gen) return;
    S.alerts = alerts;
    renderAlerts();
    drawScalars();
    loadWebhooks(gen);
    await Promise.all([loadMainHeatmap(gen), loadUpdateHeatmap(gen), loadHistogram(gen)]);
  } catch (err) {
    if (gen !== S.gen) return;
    const missing = err instanceof HttpError && / 404/.test(err.message);
    if (missing && !S.run) $("run-missing").hidden = false;
    showBanner(missing ? `There is no run with id ${S.id}.` : `Could not load this run: ${err.message}`);
  }
}

let wired = false;

function wireControls() {
  if (wired) return;
  wired = true;
  $("heat-kind").addEventListener("change", (e) => setHeat({ kind: e.target.value }));
  $("heat-stat").addEventListener("change", (e) => setHeat({ stat: e.target.value }));
  $("heat-param").addEventListener("change", (e) => setHeat({ param: e.target.value }));
  $("hist-series").addEventListener("change", (e) => {
    S.seriesKey = e.target.value;
    loadHistogram(S.gen);
  });
  $("loss-log").addEventListener("change", drawScalars);
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

export const runView = {
  enter(id) {
    wireControls();
    S.id = id;
    S.run = null;
    S.shownKeys = [];
    S.alerts = [];
    S.webhooks = {};
    S.seriesKey = null;
    S.heat = { kind: "grad", stat: "norm", param: "weight" };
    for (const name of ["run-name", "run-project", "run-step", "run-loss", "run-optimizer", "run-every"]) setText(name, "");
    $("run-id").textContent = id;
    $("crumbs").replaceChildren();
    $("run-body").hidden = true;
    $("run-missing").hidden = true;
    $("view-run").hidden = false;
    return load();
  },

  leave() {
    S.gen++;
    S.id = null;
    $("view-run").hidden = true;
    for (const id of PLOTS) {
      purge($(id));
      delete $(id).dataset.wired;
    }
    document.title = "layerwatch";
  },

  // After a reconnect: fetch everything again; live events resume from there.
  refresh() {
    if (S.id !== null) return load();
  },

  status() {
    return S.run ? S.run.status : null;
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
    if (event.type === "scalars") onScalars(event);
    else if (event.type === "layer_stats") refreshLayerViews();
    else if (event.type === "alert" && event.alert) onAlert(event.alert);
  },
};
