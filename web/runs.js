// The runs list (#/): every run, newest first, with a live status badge, its
// last step and loss, a sparkline of its loss and its alert counts; filters
// by project and by name; tick two or more runs to compare them.

import { api, throttle } from "./api.js";
import { formatNumber } from "./charts.js";
import { $, alertCounts, el, formatTime, hideBanner, showBanner, statusBadge } from "./dom.js";

let runs = [];
let active = false;
let gen = 0;
const picked = new Set(); // run ids ticked for comparison
const sparks = new Map(); // run id -> {steps, values} (downsampled loss)
const SPARK_POINTS = 80;
const SPARK_W = 120;
const SPARK_H = 26;
const SVG = "http://www.w3.org/2000/svg";

function matches(run, needle, project) {
  if (project && run.project !== project) return false;
  if (!needle) return true;
  return `${run.project ?? ""}\n${run.name ?? ""}`.toLowerCase().includes(needle);
}

function runHref(id) {
  return `#/run/${encodeURIComponent(id)}`;
}

// A loss sparkline as SVG built node by node (no markup from data); a red dot
// where the loss was not finite (null from the server).
export function sparkline(series) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", String(SPARK_W));
  svg.setAttribute("height", String(SPARK_H));
  svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
  if (!series || !series.steps.length) return svg;
  const finite = series.values.filter((v) => v !== null && Number.isFinite(v));
  const s0 = series.steps[0];
  const s1 = series.steps[series.steps.length - 1];
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const x = (s) => (s1 > s0 ? ((s - s0) / (s1 - s0)) * (SPARK_W - 4) + 2 : SPARK_W / 2);
  const y = (v) => (hi > lo ? SPARK_H - 3 - ((v - lo) / (hi - lo)) * (SPARK_H - 6) : SPARK_H / 2);
  const points = [];
  series.steps.forEach((s, i) => {
    const v = series.values[i];
    if (v === null || !Number.isFinite(v)) {
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x(s).toFixed(1));
      dot.setAttribute("cy", String(SPARK_H - 3));
      dot.setAttribute("r", "2");
      svg.append(dot);
    } else points.push(`${x(s).toFixed(1)},${y(v).toFixed(1)}`);
  });
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  const title = document.createElementNS(SVG, "title");
  title.textContent = finite.length ? `loss ${formatNumber(finite[0])} → ${formatNumber(finite[finite.length - 1])}` : "no finite loss";
  svg.prepend(title);
  return svg;
}

function renderProjects() {
  const select = $("project-filter");
  const current = select.value;
  const projects = [...new Set(runs.map((r) => r.project))].sort();
  const options = [el("option", { text: "all" }), ...projects.map((p) => el("option", { text: p }))];
  options[0].value = "";
  projects.forEach((p, i) => {
    options[i + 1].value = p;
  });
  select.replaceChildren(...options);
  select.value = projects.includes(current) ? current : "";
}

function renderCompareButton() {
  const button = $("compare-button");
  const ids = runs.filter((r) => picked.has(String(r.id))).map((r) => String(r.id));
  button.disabled = ids.length < 2;
  button.textContent = ids.length ? `compare ${ids.length}` : "compare";
}

function render() {
  if (!active) return;
  const needle = $("run-filter").value.trim().toLowerCase();
  const project = $("project-filter").value;
  const shown = runs.filter((r) => matches(r, needle, project));
  const rows = shown.map((run) => {
    const id = String(run.id);
    const link = el("a", { text: run.name });
    link.href = runHref(run.id);
    const box = el("input");
    box.type = "checkbox";
    box.checked = picked.has(id);
    box.setAttribute("aria-label", `compare ${run.name}`);
    box.addEventListener("change", () => {
      if (box.checked) picked.add(id);
      else picked.delete(id);
      tr.classList.toggle("picked", box.checked);
      renderCompareButton();
    });
    const tr = el(
      "tr",
      { className: picked.has(id) ? "picked" : "" },
      el("td", { className: "pick" }, box),
      el("td", { className: "name" }, link),
      el("td", { text: run.project }),
      el("td", {}, statusBadge(run.status)),
      el("td", { className: "num mono", text: run.last_step ?? "—" }),
      el("td", { className: "num mono", text: formatNumber(run.last_loss, "—") }),
      el("td", { className: "spark-cell" }, sparkline(sparks.get(id))),
      el("td", {}, alertCounts(run.alert_counts)),
      el("td", { className: "muted", text: formatTime(run.created_at) }),
    );
    tr.dataset.runId = id;
    tr.addEventListener("click", (event) => {
      if (event.target.closest("a, input, .pick")) return; // the link navigates by itself; the box ticks
      location.hash = runHref(run.id);
    });
    return tr;
  });
  $("runs-body").replaceChildren(...rows);
  renderCompareButton();
  const empty = $("runs-empty");
  empty.hidden = shown.length > 0;
  empty.textContent = runs.length
    ? "No run matches the filter."
    : "No runs yet. Attach the monitor in a training script — monitor.attach(model, optimizer) — or try `layerwatch demo`.";
}

const renderSoon = throttle(render, 250);

// Sparklines: one small downsampled loss request per run (the first 60 shown).
async function loadSparks(list, mine) {
  await Promise.all(
    list.slice(0, 60).map(async (run) => {
      try {
        const data = await api.scalars(run.id, "loss", { max_points: SPARK_POINTS });
        if (mine === gen) sparks.set(String(run.id), data);
      } catch {
        /* a missing sparkline leaves its cell empty */
      }
    }),
  );
  if (mine === gen) renderSoon();
}

async function load() {
  const mine = ++gen;
  try {
    const list = await api.runs();
    if (mine !== gen || !active) return;
    runs = list.slice(); // the server sends newest first
    hideBanner();
    renderProjects();
    render();
    loadSparks(runs, mine);
  } catch (err) {
    if (mine === gen && active) showBanner(`Could not load the runs: ${err.message}`);
  }
}

const reloadSoon = throttle(load, 1000);

function upsert(run) {
  const i = runs.findIndex((r) => String(r.id) === String(run.id));
  if (i >= 0) runs[i] = { ...runs[i], ...run };
  else {
    runs.unshift(run); // a new run is the newest
    renderProjects();
  }
}

// Live loss points go onto the run's sparkline; past SPARK_POINTS × 3 the
// sparkline is fetched again, downsampled.
function extendSpark(run, event) {
  const id = String(run.id);
  const spark = sparks.get(id) || { steps: [], values: [] };
  const last = spark.steps.length ? spark.steps[spark.steps.length - 1] : -Infinity;
  event.steps.forEach((s, i) => {
    if (s > last) {
      spark.steps.push(s);
      spark.values.push(event.values[i]);
    }
  });
  sparks.set(id, spark);
  if (spark.steps.length > SPARK_POINTS * 3) reloadSoon();
}

let wired = false;

export const runsView = {
  enter() {
    active = true;
    $("view-runs").hidden = false;
    if (!wired) {
      $("run-filter").addEventListener("input", render);
      $("project-filter").addEventListener("change", render);
      $("compare-button").addEventListener("click", () => {
        const ids = runs.filter((r) => picked.has(String(r.id))).map((r) => String(r.id));
        if (ids.length >= 2) location.hash = `#/compare?runs=${ids.map(encodeURIComponent).join(",")}`;
      });
      wired = true;
    }
    render();
    return load();
  },

  leave() {
    active = false;
    gen++;
    $("view-runs").hidden = true;
  },

  refresh: load,

  onEvent(event) {
    if (!active) return;
    if (event.type === "run" && event.run) {
      upsert(event.run);
      renderSoon();
      return;
    }
    const run = runs.find((r) => String(r.id) === String(event.run_id));
    if (!run) {
      if (event.type !== "alert") reloadSoon(); // a run we have not seen: fetch the list
      return;
    }
    if ((event.type === "scalars" || event.type === "layer_stats") && event.steps && event.steps.length) {
      run.last_step = Math.max(run.last_step ?? 0, ...event.steps);
      if (event.type === "scalars" && event.key === "loss") {
        run.last_loss = event.values[event.values.length - 1];
        extendSpark(run, event);
      }
      renderSoon();
    } else if (event.type === "alert") {
      reloadSoon(); // counts by severity come from the server
    }
  },
};
