// The run page's layers and histograms tabs: layer × step heatmaps (a chosen
// kind/stat, the update ratio with its 1e-3 guide, activation std, the dead
// or saturated fraction) and one series' histogram over time. A click on a
// heatmap cell opens that layer's histogram at that step.

import { ACTIVATION_PARAM, api, HttpError, STAT_FIELDS, TENSOR_KINDS } from "./api.js";
import { COLORS, LOG_STATS, renderHeatmap, renderHistogram, UPDATE_RATIO_GUIDE } from "./charts.js";
import { $, el } from "./dom.js";
import { hooks, S, seriesKey, win } from "./run_state.js";

export const PRESETS = [
  { label: "gradient norm", kind: "grad", stat: "norm", param: "weight" },
  { label: "activation std", kind: "activation", stat: "std", param: ACTIVATION_PARAM },
  { label: "dead fraction", kind: "activation", stat: "zero_frac", param: ACTIVATION_PARAM },
  { label: "weight rms", kind: "weight", stat: "rms", param: "weight" },
  { label: "NaN/Inf in grads", kind: "grad", stat: "nonfinite", param: "" },
];

export const LAYER_PLOTS = ["heatmap-main", "heatmap-update", "heatmap-act", "heatmap-frac"];

function heatOptions(kind, stat) {
  const log = LOG_STATS.has(stat);
  const options = { log, title: `${kind}<br>${stat}${log ? "<br>(log10)" : ""}`, empty: `No ${kind} ${stat} recorded yet` };
  if (stat === "zero_frac") Object.assign(options, { zmin: 0, zmax: 1, title: `${kind}<br>zero_frac<br>(dead)` });
  if (stat === "sat_frac") Object.assign(options, { zmin: 0, zmax: 1, colorscale: "Inferno", title: `${kind}<br>sat_frac<br>(saturated)` });
  if (stat === "mean") Object.assign(options, { colorscale: "RdBu", zmid: 0 });
  if (stat === "nonfinite") Object.assign(options, { colorscale: [[0, COLORS.panel2], [1, COLORS.severity.critical]], title: `${kind}<br>nonfinite<br>(NaN/Inf)` });
  return options;
}

export function paramsFor(kind) {
  return [...new Set(S.series.filter((s) => s.kind === kind).map((s) => s.param))];
}

function fillSelect(select, values, labelOf = (v) => v) {
  select.replaceChildren(...values.map((v) => el("option", { text: labelOf(v) })));
  values.forEach((v, i) => {
    select.options[i].value = v;
  });
}

export function renderPickers() {
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
  $("frac-stat").value = S.frac;
  $("frac-title").textContent = S.frac === "sat_frac" ? "Saturated fraction · layer × step" : "Dead fraction · layer × step";
}

export function setHeat(change) {
  Object.assign(S.heat, change);
  if (change.kind && change.param === undefined) {
    const params = paramsFor(change.kind);
    const preferred = change.kind === "activation" ? ACTIVATION_PARAM : "weight";
    S.heat.param = params.includes(preferred) ? preferred : "";
  }
  renderPickers();
  hooks.writeUrl(false);
  loadMainHeatmap(S.gen);
}

export function setFrac(stat) {
  S.frac = stat === "sat_frac" ? "sat_frac" : "zero_frac";
  renderPickers();
  hooks.writeUrl(false);
  loadFracHeatmap(S.gen);
}

async function drawHeat(id, query, options, gen, still = () => true) {
  const heat = await api.heatmap(S.id, query, win("heatmap"));
  if (gen !== S.gen || S.tab !== "layers" || !still()) return;
  S.heatData[id] = heat;
  await renderHeatmap($(id), heat, { ...options, xRange: S.range });
}

export function loadMainHeatmap(gen) {
  const { kind, stat, param } = S.heat;
  const still = () => kind === S.heat.kind && stat === S.heat.stat && param === S.heat.param;
  return drawHeat("heatmap-main", { kind, stat, param }, heatOptions(kind, stat), gen, still);
}

function loadUpdateHeatmap(gen) {
  const params = paramsFor("weight");
  // Fixed range 1e-6 .. 1 centred on the 1e-3 guide, so colours mean the same at every step.
  return drawHeat(
    "heatmap-update",
    { kind: "weight", stat: "update_ratio", param: params.includes("weight") ? "weight" : "" },
    {
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
    },
    gen,
  );
}

function loadActHeatmap(gen) {
  return drawHeat("heatmap-act", { kind: "activation", stat: "std", param: ACTIVATION_PARAM }, heatOptions("activation", "std"), gen);
}

function loadFracHeatmap(gen) {
  const stat = S.frac;
  return drawHeat("heatmap-frac", { kind: "activation", stat, param: ACTIVATION_PARAM }, heatOptions("activation", stat), gen, () => stat === S.frac);
}

export function loadLayers(gen) {
  return Promise.all([loadMainHeatmap(gen), loadUpdateHeatmap(gen), loadActHeatmap(gen), loadFracHeatmap(gen)]);
}

// A click on a heatmap cell: that row's layer, at that column's step.
export function wireHeatClicks(id) {
  const gd = $(id);
  if (gd.dataset.clicks) return;
  gd.dataset.clicks = "1";
  gd.on("plotly_click", (event) => {
    const point = event.points && event.points[0];
    const heat = S.heatData[id];
    if (!point || !heat) return;
    const row = Array.isArray(point.pointNumber) ? point.pointNumber[0] : point.pointIndex?.[0];
    if (row === undefined || !heat.layers[row]) return;
    const step = typeof point.x === "number" ? point.x : null;
    hooks.openLayer(heat.layers[row], step, { param: heat.params[row], kind: heat.kind });
  });
}

// ------------------------------------------------------------------ histograms

function seriesLabel(s) {
  return `${tensorLabel(s)} · ${s.kind}`;
}

// "layer.param", or the parameter alone for the root module (layer ""), as model.named_parameters() says it.
function tensorLabel(s) {
  return s.layer ? `${s.layer}.${s.param}` : s.param;
}

export function renderSeriesSelect() {
  const select = $("hist-series");
  const keys = S.series.map(seriesKey);
  select.replaceChildren(...S.series.map((s) => el("option", { text: seriesLabel(s) })));
  keys.forEach((k, i) => {
    select.options[i].value = k;
  });
  // A layer asked for (deep link, click) wins once its series exist.
  const wanted = S.want && pickSeries(S.want);
  if (wanted) S.seriesKey = seriesKey(wanted);
  if (!keys.includes(S.seriesKey)) {
    const first = S.series.find((s) => s.kind === "grad" && s.param === "weight") || S.series[0];
    S.seriesKey = first ? seriesKey(first) : null;
  }
  if (S.seriesKey) select.value = S.seriesKey;
}

// The series closest to what was asked for: exact, else same layer and kind, else same layer.
export function pickSeries(wanted) {
  return (
    S.series.find((s) => seriesKey(s) === seriesKey(wanted)) ||
    S.series.find((s) => s.layer === wanted.layer && s.kind === wanted.kind && s.param === "weight") ||
    S.series.find((s) => s.layer === wanted.layer && s.kind === wanted.kind) ||
    S.series.find((s) => s.layer === wanted.layer) ||
    null
  );
}

export function chosenSeries() {
  return S.series.find((s) => seriesKey(s) === S.seriesKey) || null;
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

export async function loadHistogram(gen) {
  if (S.tab !== "histograms") return;
  const chosen = chosenSeries();
  if (!chosen) {
    describeNonfinite(null);
    await renderHistogram($("histogram-plot"), null, null, "", { xRange: S.range });
    return;
  }
  const query = { layer: chosen.layer, param: chosen.param, kind: chosen.kind };
  const orNull = (err) => (err instanceof HttpError ? null : Promise.reject(err));
  const [hist, stats] = await Promise.all([
    api.histograms(S.id, query, win("histogram")).catch(orNull),
    api.layerStats(S.id, query, win("histogram")).catch(orNull),
  ]);
  if (gen !== S.gen || S.seriesKey !== seriesKey(chosen) || S.tab !== "histograms") return;
  describeNonfinite(stats);
  await renderHistogram($("histogram-plot"), hist, stats, `${tensorLabel(chosen)} (${chosen.kind})`, { xRange: S.range, step: S.step });
}
