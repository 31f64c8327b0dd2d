// The compare view (#/compare?runs=a,b&layer=fc1&kind=grad&stat=norm): two
// or more runs' loss and one layer statistic overlaid, aligned by step.
// Zooming writes x0/x1 into the URL and refetches that window.

import { api, STAT_FIELDS, stepWindow, TENSOR_KINDS } from "./api.js";
import { purge, renderLines } from "./charts.js";
import { $, el, hideBanner, showBanner, statusBadge } from "./dom.js";

const C = { ids: [], runs: [], layer: null, kind: "grad", stat: "norm", range: null, gen: 0 };
const PLOTS = ["compare-loss", "compare-stat-plot"];

function hash() {
  const q = new URLSearchParams();
  q.set("runs", C.ids.join(","));
  if (C.layer !== null) q.set("layer", C.layer);
  q.set("kind", C.kind);
  q.set("stat", C.stat);
  if (C.range) {
    q.set("x0", String(C.range[0]));
    q.set("x1", String(C.range[1]));
  }
  return `#/compare?${q.toString().replace(/%2C/g, ",")}`;
}

function writeUrl() {
  const h = hash();
  if (h !== location.hash) history.replaceState(null, "", h);
}

function fill(select, values, current) {
  select.replaceChildren(...values.map((v) => el("option", { text: v })));
  values.forEach((v, i) => {
    select.options[i].value = v;
  });
  if (values.includes(current)) select.value = current;
}

// Layers of the chosen kind that the runs share (forward order of the first run), else all of them.
function layersFor(kind) {
  const lists = C.runs.map((r) => [...new Set((r.series || []).filter((s) => s.kind === kind).map((s) => s.layer))]);
  if (!lists.length) return [];
  const shared = lists[0].filter((l) => lists.every((list) => list.includes(l)));
  return shared.length ? shared : [...new Set(lists.flat())];
}

function paramFor(run, layer, kind) {
  const params = (run.series || []).filter((s) => s.layer === layer && s.kind === kind).map((s) => s.param);
  return params.includes("weight") ? "weight" : params.includes("output") ? "output" : params[0];
}

function renderControls() {
  const layers = layersFor(C.kind);
  if (layers.length && !layers.includes(C.layer)) C.layer = layers[0];
  fill($("compare-layer"), layers, C.layer);
  fill($("compare-kind"), TENSOR_KINDS, C.kind);
  fill($("compare-stat"), STAT_FIELDS, C.stat);
  $("compare-stat-title").textContent = C.layer === null ? "Layer statistic" : `${C.layer} · ${C.kind} ${C.stat}`;
}

const label = (run) => (C.runs.filter((r) => r.name === run.name).length > 1 ? `${run.name} (${String(run.id).slice(0, 8)})` : run.name);

async function drawLoss(gen) {
  const data = await Promise.all(C.runs.map((r) => api.scalars(r.id, "loss", stepWindow(C.range, 2000))));
  if (gen !== C.gen) return;
  const series = C.runs.map((r, i) => ({ name: label(r), x: data[i].steps, y: data[i].values }));
  await renderLines($("compare-loss"), series, { yTitle: "loss", logY: $("compare-log").checked, xRange: C.range, empty: "No loss logged" });
}

async function drawStat(gen) {
  const series = await Promise.all(
    C.runs.map(async (r) => {
      const param = C.layer === null ? undefined : paramFor(r, C.layer, C.kind);
      if (param === undefined) return { name: label(r), x: [], y: [] };
      const s = await api.layerStats(r.id, { layer: C.layer, param, kind: C.kind }, stepWindow(C.range, 2000));
      return { name: label(r), x: s.steps, y: s[C.stat] || [] };
    }),
  );
  if (gen !== C.gen) return;
  const log = ["norm", "rms", "std", "update_ratio"].includes(C.stat);
  await renderLines($("compare-stat-plot"), series, { yTitle: `${C.kind} ${C.stat}`, logY: log, xRange: C.range, empty: "No such statistic in these runs" });
}

function draw() {
  const gen = C.gen;
  renderControls();
  writeUrl();
  return Promise.all([drawLoss(gen), drawStat(gen)])
    .then(() => PLOTS.forEach(wireRange))
    .catch((err) => gen === C.gen && showBanner(`Could not load the comparison: ${err.message}`));
}

let syncing = 0;
function wireRange(id) {
  const gd = $(id);
  if (gd.dataset.range) return;
  gd.dataset.range = "1";
  gd.on("plotly_relayout", (ev) => {
    if (syncing) return;
    let range;
    if (ev["xaxis.autorange"]) range = null;
    else if (ev["xaxis.range[0]"] !== undefined) range = [Math.floor(ev["xaxis.range[0]"]), Math.ceil(ev["xaxis.range[1]"])];
    else return;
    C.range = range;
    writeUrl();
    for (const other of PLOTS) {
      if (other === id) continue;
      syncing++;
      const update = range ? { "xaxis.range": range.slice(), "xaxis.autorange": false } : { "xaxis.autorange": true };
      Promise.resolve(window.Plotly.relayout($(other), update)).finally(() => syncing--);
    }
    clearTimeout(C.timer);
    C.timer = setTimeout(draw, 300);
  });
}

let wired = false;

export const compareView = {
  async enter(params) {
    if (!wired) {
      wired = true;
      $("compare-layer").addEventListener("change", (e) => {
        C.layer = e.target.value;
        draw();
      });
      $("compare-kind").addEventListener("change", (e) => {
        C.kind = e.target.value;
        draw();
      });
      $("compare-stat").addEventListener("change", (e) => {
        C.stat = e.target.value;
        draw();
      });
      $("compare-log").addEventListener("change", draw);
    }
    const gen = ++C.gen;
    C.runs = []; // until loaded, a reconnect's refresh() has nothing to draw
    C.ids = (params.get("runs") || "").split(",").filter(Boolean);
    C.layer = params.get("layer");
    C.kind = TENSOR_KINDS.includes(params.get("kind")) ? params.get("kind") : "grad";
    C.stat = STAT_FIELDS.includes(params.get("stat")) ? params.get("stat") : "norm";
    const x0 = Number(params.get("x0"));
    const x1 = Number(params.get("x1"));
    C.range = params.has("x0") && params.has("x1") && x1 > x0 ? [x0, x1] : null;
    $("view-compare").hidden = false;
    $("compare-empty").hidden = C.ids.length >= 2;
    const back = el("a", { text: "runs" });
    back.href = "#/";
    $("crumbs").replaceChildren(back, el("span", { className: "sep", text: "/" }), el("span", { text: `compare ${C.ids.length}` }));
    document.title = "compare · layerwatch";
    try {
      C.runs = await Promise.all(C.ids.map((id) => api.run(id)));
    } catch (err) {
      if (gen === C.gen) showBanner(`Could not load the runs to compare: ${err.message}`);
      return;
    }
    if (gen !== C.gen) return;
    hideBanner();
    $("compare-runs").replaceChildren(
      ...C.runs.map((r) => {
        const link = el("a", { text: r.name });
        link.href = `#/run/${encodeURIComponent(r.id)}`;
        return el("span", { className: "chip" }, link, statusBadge(r.status));
      }),
    );
    await draw();
  },

  leave() {
    C.gen++;
    clearTimeout(C.timer);
    $("view-compare").hidden = true;
    for (const id of PLOTS) {
      purge($(id));
      delete $(id).dataset.range;
    }
  },

  refresh() {
    if (C.runs.length) return draw();
  },

  onEvent(event) {
    if (event.type === "scalars" && event.key === "loss" && C.ids.includes(String(event.run_id))) refreshSoon();
  },
};

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (C.runs.length) draw();
  }, 1000);
}
