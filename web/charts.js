// What is drawn: Plotly figures built from the REST payloads. No fetching
// here; app.js hands in data and a div. Every user-provided string placed in
// a Plotly label is passed through escapeHtml first.

import { escapeHtml, HIST_BINS } from "./api.js";

/* global Plotly */

// The plot colours follow the page's theme (style.css variables, dark or
// light); refreshPalette() reads them again after the theme changes.
export const COLORS = {
  text: "#c9d1d9",
  muted: "#8b949e",
  grid: "#21262d",
  panel: "#161b22",
  panel2: "#1c2128",
  border: "#30363d",
  plot: "#0d1117",
  severity: { info: "#58a6ff", warning: "#d29922", critical: "#f85149" },
  traces: ["#58a6ff", "#f0883e", "#3fb950", "#bc8cff", "#ff7b72", "#39c5cf", "#d29922"],
};

export function refreshPalette() {
  const css = getComputedStyle(document.documentElement);
  const v = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  Object.assign(COLORS, {
    text: v("--text", COLORS.text),
    muted: v("--muted", COLORS.muted),
    grid: v("--grid", COLORS.grid),
    panel: v("--panel", COLORS.panel),
    panel2: v("--panel-2", COLORS.panel2),
    border: v("--border", COLORS.border),
    plot: v("--plot", COLORS.plot),
  });
  COLORS.severity = { info: v("--info", "#58a6ff"), warning: v("--warning", "#d29922"), critical: v("--critical", "#f85149") };
  COLORS.traces = v("--traces", COLORS.traces.join(" ")).split(/\s+/);
}

// The x axis of every step plot: the shown step range when one is set (zoom,
// deep link), else the whole run.
export function stepAxis(xRange) {
  return xRange ? { range: xRange.slice(), autorange: false } : { autorange: true };
}

// Stats whose values span decades and are >= 0: drawn on a log10 colour scale.
export const LOG_STATS = new Set(["norm", "rms", "std", "update_ratio", "numel"]);

// Karpathy's rule of thumb: a healthy step changes a weight by ~1e-3 of its
// size (CS231n "Neural Networks Part 3", ratio of updates to values).
export const UPDATE_RATIO_GUIDE = 1e-3;

// Histogram counts: zero is the plot's background, dense bins glow (magma-like).
const countScale = () => [
  [0, COLORS.plot],
  [0.12, "#2c115f"],
  [0.35, "#721f81"],
  [0.6, "#d3436e"],
  [0.82, "#fd9f6c"],
  [1, "#fcfdbf"],
];

const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

function baseLayout(extra = {}) {
  return {
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: COLORS.plot,
    font: { family: "Inter, system-ui, -apple-system, Segoe UI, sans-serif", size: 12, color: COLORS.text },
    margin: { l: 60, r: 20, t: 10, b: 40 },
    // Keep the user's zoom and pan while live updates redraw the plot.
    uirevision: "keep",
    hoverlabel: { bgcolor: COLORS.panel, bordercolor: COLORS.border, font: { color: COLORS.text }, align: "left" },
    xaxis: { title: { text: "step" }, gridcolor: COLORS.grid, zeroline: false, automargin: true },
    yaxis: { gridcolor: COLORS.grid, zeroline: false, automargin: true },
    ...extra,
  };
}

// `missing` is what null means where the number is shown: the REST API sends
// NaN/Inf as null, and a heatmap cell is null for those.
export function formatNumber(v, missing = "NaN/Inf") {
  if (v === null || v === undefined) return missing;
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

// Break a plain string into lines of about `width` characters, escape each,
// and join with <br> for a Plotly hover label.
function wrapEscaped(text, width = 60) {
  const words = String(text ?? "").split(/\s+/);
  const lines = [];
  let line = "";
  for (const word of words) {
    if (line && line.length + word.length + 1 > width) {
      lines.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(line);
  return lines.map(escapeHtml).join("<br>");
}

function emptyAnnotation(text) {
  return {
    text: escapeHtml(text),
    xref: "paper",
    yref: "paper",
    x: 0.5,
    y: 0.5,
    showarrow: false,
    font: { color: COLORS.muted, size: 13 },
  };
}

// ------------------------------------------------------------------ scalars

// Loss-like keys share the left axis; anything else (lr, grad_scale, ...) has
// a different unit and goes on the right.
export const scalarAxis = (key) => (/loss|acc|err/i.test(key) ? "y" : "y2");

function alertY(scalars, step) {
  const loss = scalars.loss;
  if (!loss || !loss.steps.length) return 0;
  let best = null;
  for (let i = 0; i < loss.steps.length; i++) {
    if (loss.steps[i] > step) break;
    if (loss.values[i] !== null) best = loss.values[i];
  }
  return best ?? loss.values.find((v) => v !== null) ?? 0;
}

export function alertHover(alert) {
  const steps = alert.last_step != null && alert.last_step !== alert.step ? `${alert.step}–${alert.last_step}` : `${alert.step}`;
  const parts = [
    `<b>${escapeHtml(alert.severity)} · ${escapeHtml(alert.rule)}</b>`,
    `step ${steps}${alert.count > 1 ? ` (×${alert.count})` : ""}${alert.layer ? ` · layer ${escapeHtml(alert.layer)}` : ""}`,
    wrapEscaped(alert.message),
  ];
  if (alert.remedy) parts.push(`<i>remedy:</i> ${wrapEscaped(alert.remedy)}`);
  return parts.join("<br>");
}

// `keys` are the shown scalar keys, loss first; trace i is keys[i], so live
// points can be appended with Plotly.extendTraces(div, ..., [i]).
export function renderScalars(div, { scalars, keys, alerts, logY, xRange }) {
  const traces = keys.map((key, i) => ({
    type: "scatter",
    mode: "lines",
    name: escapeHtml(key),
    x: scalars[key] ? scalars[key].steps.slice() : [],
    y: scalars[key] ? scalars[key].values.slice() : [],
    yaxis: scalarAxis(key),
    line: { color: COLORS.traces[i % COLORS.traces.length], width: key === "loss" ? 2 : 1.5 },
    connectgaps: false,
    hovertemplate: `${escapeHtml(key)} %{y:.4g}<br>step %{x}<extra></extra>`,
  }));
  const shapes = [];
  if (alerts.length) {
    traces.push({
      type: "scatter",
      mode: "markers",
      name: "alerts",
      x: alerts.map((a) => a.step),
      y: alerts.map((a) => alertY(scalars, a.step)),
      yaxis: "y",
      marker: {
        symbol: "diamond",
        size: 12,
        color: alerts.map((a) => COLORS.severity[a.severity] || COLORS.muted),
        line: { color: COLORS.plot, width: 1 },
      },
      text: alerts.map(alertHover),
      customdata: alerts.map((_, i) => i), // a click finds its alert by index
      hovertemplate: "%{text}<br><i>click: show the layer</i><extra></extra>",
    });
    for (const a of alerts) {
      shapes.push({
        type: "line",
        xref: "x",
        yref: "paper",
        x0: a.step,
        x1: a.step,
        y0: 0,
        y1: 1,
        line: { color: COLORS.severity[a.severity] || COLORS.muted, width: 1, dash: "dot" },
      });
    }
  }
  const hasRight = keys.some((k) => scalarAxis(k) === "y2");
  const layout = baseLayout({
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.12, bgcolor: "rgba(0,0,0,0)" },
    margin: { l: 60, r: hasRight ? 60 : 20, t: 30, b: 40 },
    hovermode: "closest",
    shapes,
    annotations: keys.some((k) => scalars[k] && scalars[k].steps.length) ? [] : [emptyAnnotation("No scalars logged yet")],
  });
  layout.yaxis = { ...layout.yaxis, type: logY ? "log" : "linear", title: { text: "loss" } };
  layout.xaxis = { ...layout.xaxis, ...stepAxis(xRange) };
  if (hasRight) {
    const right = keys.filter((k) => scalarAxis(k) === "y2").map(escapeHtml).join(", ");
    layout.yaxis2 = {
      overlaying: "y",
      side: "right",
      tickmode: "auto",
      showgrid: false,
      automargin: true,
      zeroline: false,
      exponentformat: "e",
      title: { text: right },
    };
  }
  return Plotly.react(div, traces, layout, PLOT_CONFIG);
}

// ------------------------------------------------------------------ heatmaps

// Colourbar ticks for log10 values: each decade, and 2× and 5× as well when
// the range spans less than three decades (else a short bar shows one tick).
function logTicks(lo, hi) {
  const vals = [];
  const steps = hi - lo < 3 ? [0, Math.log10(2), Math.log10(5)] : [0];
  for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) for (const s of steps) vals.push(k + s);
  const text = (v) => (Number.isInteger(v) ? `1e${v}` : formatNumber(10 ** v));
  return { tickvals: vals, ticktext: vals.map(text) };
}

// A layer × step heatmap. `options`: log (bool), title (colorbar, may hold
// <br>), colorscale, zmin/zmax/zmid, guide (a healthy value, marked on the
// colorbar and in the hover), empty (text when there are no rows). Rows are labelled with layer names when
// all rows share one param, else with the full row name ("fc1.weight").
export function renderHeatmap(div, heat, options) {
  const rows = heat.rows || [];
  const oneParam = rows.length > 0 && new Set(heat.params).size === 1;
  const labels = (oneParam ? heat.layers : rows).map(escapeHtml);
  const raw = heat.z || [];
  const text = raw.map((row) => row.map(formatNumber));
  let z = raw;
  let colorbarTicks = {};
  let zRange = {};
  if (options.log) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const row of raw) {
      for (const v of row) {
        if (v !== null && v > 0) {
          const l = Math.log10(v);
          if (l < lo) lo = l;
          if (l > hi) hi = l;
        }
      }
    }
    if (options.zmin !== undefined) {
      lo = Math.min(lo, options.zmin);
      hi = Math.max(hi, options.zmax);
    }
    if (!Number.isFinite(lo)) {
      lo = -1;
      hi = 0;
    }
    // Exact zeros (a dead layer's gradient) are drawn as the lowest colour,
    // not as a gap: a gap means "not sampled" or NaN/Inf.
    const floor = options.zmin !== undefined ? options.zmin : lo - 0.5;
    z = raw.map((row) => row.map((v) => (v === null ? null : v > 0 ? Math.max(Math.log10(v), floor) : floor)));
    if (options.zmin !== undefined) zRange = { zmin: options.zmin, zmax: options.zmax };
    colorbarTicks = logTicks(options.zmin ?? floor, options.zmax ?? hi);
    if (options.guide !== undefined) {
      const at = colorbarTicks.tickvals.indexOf(Math.log10(options.guide));
      if (at >= 0) colorbarTicks.ticktext[at] += " guide";
    }
  } else if (options.zmin !== undefined) {
    zRange = { zmin: options.zmin, zmax: options.zmax };
  }
  const trace = {
    type: "heatmap",
    x: (heat.steps || []).slice(),
    y: labels,
    z,
    text,
    colorscale: options.colorscale || "Viridis",
    ...zRange,
    ...(options.zmid !== undefined ? { zmid: options.zmid } : {}),
    hoverongaps: true,
    xgap: 0,
    ygap: 1,
    colorbar: {
      title: { text: options.title, side: "top", font: { size: 11 } },
      // Shorter than the plot, from the bottom: room above it for the title.
      len: 0.78,
      y: 0,
      yanchor: "bottom",
      thickness: 12,
      outlinewidth: 0,
      tickfont: { size: 10 },
      ...colorbarTicks,
    },
    hovertemplate:
      `layer %{y}<br>step %{x}<br>${escapeHtml(heat.kind)} ${escapeHtml(heat.stat)} %{text}` +
      `${options.guide !== undefined ? ` (guide ≈ ${formatNumber(options.guide)})` : ""}<extra></extra>`,
  };
  // About 18 px a layer, so a deep model's names stay readable.
  const height = Math.max(260, Math.min(900, labels.length * 18 + 70));
  div.style.height = `${height}px`;
  const layout = baseLayout({
    height,
    margin: { l: 80, r: 10, t: 10, b: 40 },
    annotations: labels.length ? [] : [emptyAnnotation(options.empty || "No data yet")],
  });
  layout.yaxis = { ...layout.yaxis, type: "category", autorange: "reversed", showgrid: false, tickfont: { size: 11 } };
  layout.xaxis = { ...layout.xaxis, showgrid: false, ...stepAxis(options.xRange) };
  return Plotly.react(div, labels.length ? [trace] : [], layout, PLOT_CONFIG);
}

// ------------------------------------------------------------------ histograms

// Each stored step has its own evenly spaced bins from lo to hi. To draw steps
// side by side they are re-binned onto one value axis from the smallest lo to
// the largest hi, spreading each bin's count over the common bins it overlaps
// in proportion to the overlap (counts inside a bin are taken as uniform).
export function rebinHistograms(hist, outBins = 64) {
  let lo = Infinity;
  let hi = -Infinity;
  hist.steps.forEach((_, s) => {
    const a = hist.lo[s];
    const b = hist.hi[s];
    if (a !== null && b !== null) {
      lo = Math.min(lo, a);
      hi = Math.max(hi, b);
    }
  });
  if (!Number.isFinite(lo)) return null;
  if (hi <= lo) hi = lo + Math.max(1e-6, Math.abs(lo) * 1e-3);
  const width = (hi - lo) / outBins;
  const clamp = (j) => Math.max(0, Math.min(outBins - 1, j));
  const z = Array.from({ length: outBins }, () => new Array(hist.steps.length).fill(0));
  hist.steps.forEach((_, s) => {
    const a = hist.lo[s];
    const b = hist.hi[s];
    const counts = hist.counts[s];
    if (a === null || b === null || !counts) {
      for (const row of z) row[s] = null;
      return;
    }
    const bw = (b - a) / (counts.length || HIST_BINS);
    counts.forEach((c, k) => {
      if (!c) return;
      const e0 = a + k * bw;
      const e1 = e0 + bw;
      if (bw <= 0) {
        z[clamp(Math.floor((e0 - lo) / width))][s] += c;
        return;
      }
      const j0 = clamp(Math.floor((e0 - lo) / width));
      const j1 = clamp(Math.ceil((e1 - lo) / width) - 1);
      for (let j = j0; j <= j1; j++) {
        const overlap = Math.min(e1, lo + (j + 1) * width) - Math.max(e0, lo + j * width);
        if (overlap > 0) z[j][s] += (c * overlap) / bw;
      }
    });
  });
  const centers = Array.from({ length: outBins }, (_, j) => lo + (j + 0.5) * width);
  return { lo, hi, width, centers, z };
}

// Histogram over time: a (value bins × steps) heatmap of log10(1 + count),
// the mean from layer_stats on top of it, and above, the per-step count of
// NaN/Inf elements (which a histogram of finite values cannot show).
export function renderHistogram(div, hist, stats, label, { xRange, step } = {}) {
  const binned = hist && hist.steps.length ? rebinHistograms(hist) : null;
  const traces = [];
  const safeLabel = escapeHtml(label);
  if (binned) {
    const { centers, z, width } = binned;
    traces.push({
      type: "heatmap",
      x: hist.steps.slice(),
      y: centers,
      z: z.map((row) => row.map((c) => (c === null ? null : Math.log10(1 + c)))),
      text: z.map((row, j) =>
        row.map((c) => `${formatNumber(centers[j] - width / 2)} … ${formatNumber(centers[j] + width / 2)}: ${c === null ? "no finite values" : `≈${Math.round(c)}`}`),
      ),
      colorscale: countScale(),
      zmin: 0,
      colorbar: { title: { text: "log10<br>(1+count)", side: "top" }, thickness: 12, outlinewidth: 0, len: 0.76, y: 0, yanchor: "bottom" },
      hovertemplate: `${safeLabel}<br>step %{x}<br>%{text}<extra></extra>`,
      yaxis: "y",
    });
  }
  if (stats && stats.steps && stats.steps.length && binned) {
    traces.push({
      type: "scatter",
      mode: "lines",
      name: "mean",
      x: stats.steps.slice(),
      y: stats.mean.slice(),
      line: { color: "rgba(255,255,255,0.7)", width: 1, dash: "dot" },
      hovertemplate: "mean %{y:.4g}<br>step %{x}<extra></extra>",
      yaxis: "y",
    });
  }
  if (stats && stats.steps && stats.steps.length) {
    const nonfinite = stats.nonfinite.map((v) => v ?? 0);
    traces.push({
      type: "bar",
      name: "NaN/Inf",
      x: stats.steps.slice(),
      y: nonfinite,
      marker: { color: COLORS.severity.critical },
      hovertemplate: "step %{x}<br>%{y} non-finite elements<extra></extra>",
      yaxis: "y2",
    });
  }
  const layout = baseLayout({
    showlegend: false,
    margin: { l: 60, r: 10, t: 10, b: 40 },
    bargap: 0,
    annotations: binned ? [] : [emptyAnnotation("No histograms for this series yet")],
    // The step picked in a heatmap or by an alert, marked across both panes.
    shapes:
      step === null || step === undefined
        ? []
        : [{ type: "line", xref: "x", yref: "paper", x0: step, x1: step, y0: 0, y1: 1, line: { color: COLORS.severity.warning, width: 1.5, dash: "dash" } }],
  });
  layout.xaxis = { ...layout.xaxis, ...stepAxis(xRange) };
  layout.yaxis = { ...layout.yaxis, domain: [0, 0.76], title: { text: "value" }, tickformat: ".2~g" };
  layout.yaxis2 = {
    domain: [0.82, 1],
    title: { text: "NaN/Inf", font: { color: COLORS.severity.critical, size: 11 } },
    rangemode: "tozero",
    gridcolor: COLORS.grid,
    zeroline: false,
    automargin: true,
    tickfont: { size: 10 },
    nticks: 3,
  };
  return Plotly.react(div, traces, layout, PLOT_CONFIG);
}

// Lines over steps sharing one y axis: the learning rate, or several runs
// overlaid in the compare view. `series`: [{name, x, y}] (names escaped here).
export function renderLines(div, series, { yTitle = "", logY = false, xRange = null, empty = "No data yet", toZero = false } = {}) {
  const traces = series.map((s, i) => ({
    type: "scatter",
    mode: "lines",
    name: escapeHtml(s.name),
    x: s.x.slice(),
    y: s.y.slice(),
    connectgaps: false,
    line: { color: COLORS.traces[i % COLORS.traces.length], width: 1.6 },
    hovertemplate: `${escapeHtml(s.name)}<br>step %{x}<br>%{y:.4g}<extra></extra>`,
  }));
  const layout = baseLayout({
    showlegend: series.length > 1,
    legend: { orientation: "h", x: 0, y: 1.14, bgcolor: "rgba(0,0,0,0)" },
    margin: { l: 60, r: 20, t: series.length > 1 ? 30 : 10, b: 40 },
    hovermode: "x unified",
    annotations: series.some((s) => s.x.length) ? [] : [emptyAnnotation(empty)],
  });
  layout.yaxis = {
    ...layout.yaxis,
    type: logY ? "log" : "linear",
    title: { text: escapeHtml(yTitle) },
    exponentformat: "e",
    // A constant learning rate is a flat line above zero, not a line "at 0" in a ±1 range.
    ...(toZero && !logY ? { rangemode: "tozero" } : {}),
    ...(logY ? { nticks: 6 } : {}),
  };
  layout.xaxis = { ...layout.xaxis, ...stepAxis(xRange) };
  return Plotly.react(div, traces, layout, PLOT_CONFIG);
}

export function purge(div) {
  if (div && div.data) Plotly.purge(div);
}
