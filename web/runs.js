// The runs list (#/): every run, newest first, with a live status badge, its
// last step and loss and its alert counts; a filter box; a click opens a run.

import { api, throttle } from "./api.js";
import { formatNumber } from "./charts.js";
import { $, alertCounts, el, formatTime, hideBanner, showBanner, statusBadge } from "./dom.js";

let runs = [];
let active = false;
let gen = 0;

function matches(run, needle) {
  if (!needle) return true;
  return `${run.project ?? ""}\n${run.name ?? ""}`.toLowerCase().includes(needle);
}

function runHref(id) {
  return `#/run/${encodeURIComponent(id)}`;
}

function render() {
  if (!active) return;
  const needle = $("run-filter").value.trim().toLowerCase();
  const shown = runs.filter((r) => matches(r, needle));
  const rows = shown.map((run) => {
    const link = el("a", { text: run.name });
    link.href = runHref(run.id);
    const tr = el(
      "tr",
      {},
      el("td", { className: "name" }, link),
      el("td", { text: run.project }),
      el("td", {}, statusBadge(run.status)),
      el("td", { className: "num mono", text: run.last_step ?? "—" }),
      el("td", { className: "num mono", text: formatNumber(run.last_loss, "—") }),
      el("td", {}, alertCounts(run.alert_counts)),
      el("td", { className: "muted", text: formatTime(run.created_at) }),
    );
    tr.dataset.runId = String(run.id);
    tr.addEventListener("click", (event) => {
      if (event.target.closest("a")) return; // the link navigates by itself
      location.hash = runHref(run.id);
    });
    return tr;
  });
  $("runs-body").replaceChildren(...rows);
  const empty = $("runs-empty");
  empty.hidden = shown.length > 0;
  empty.textContent = runs.length
    ? "No run matches the filter."
    : "No runs yet. Attach the monitor in a training script — monitor.attach(model, optimizer) — or try `layerwatch demo`.";
}

const renderSoon = throttle(render, 250);

async function load() {
  const mine = ++gen;
  try {
    const list = await api.runs();
    if (mine !== gen || !active) return;
    runs = list.slice(); // the server sends newest first
    hideBanner();
    render();
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
  }
}

let wired = false;

export const runsView = {
  enter() {
    active = true;
    $("view-runs").hidden = false;
    if (!wired) {
      $("run-filter").addEventListener("input", render);
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
      if (event.type === "scalars" && event.key === "loss") run.last_loss = event.values[event.values.length - 1];
      renderSoon();
    } else if (event.type === "alert") {
      reloadSoon(); // counts by severity come from the server
    }
  },
};
