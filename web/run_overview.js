// The run page's overview tab: the loss and any other logged scalar (val_loss
// on the same axes) with alert markers, the learning rate, and the health
// summary — which rules fired, on which layers, since when.

import { api, SEVERITIES, throttle } from "./api.js";
import { renderLines, renderScalars } from "./charts.js";
import { $, el, severityBadge } from "./dom.js";
import { hooks, MAX_POINTS, S, win } from "./run_state.js";

/* global Plotly */

export function orderedKeys(keys) {
  const list = [...keys];
  list.sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : 0));
  return list;
}

// The learning-rate scalar, if the script logs one (mon.log(lr=...)).
export function lrKey() {
  return (S.run.scalar_keys || []).find((k) => /^(lr|learning_rate)$|(^|[._/])lr($|[._/])/i.test(k)) || null;
}

export function renderKeyChips() {
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
export function appendPoints(entry, steps, values) {
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

export async function loadScalarKey(key, gen) {
  const entry = { steps: [], values: [], loading: true, pending: [] };
  S.scalars[key] = entry;
  const data = await api.scalars(S.id, key, win("scalars"));
  if (gen !== S.gen || S.scalars[key] !== entry) return;
  entry.steps = data.steps.slice();
  entry.values = data.values.slice();
  entry.loading = false;
  // Events that arrived while the fetch was in flight.
  for (const event of entry.pending) appendPoints(entry, event.steps, event.values);
  entry.pending = [];
}

// Every scalar the overview shows, for the current step range.
export async function loadOverview(gen) {
  const keys = new Set(S.shownKeys);
  const lr = lrKey();
  if (lr) keys.add(lr);
  await Promise.all([...keys].map((k) => loadScalarKey(k, gen)));
  if (gen === S.gen) drawOverview();
}

export function drawScalars() {
  if (S.tab !== "overview") return;
  renderScalars($("loss-plot"), { scalars: S.scalars, keys: S.shownKeys, alerts: S.alerts, logY: $("loss-log").checked, xRange: S.range });
}

export function drawLr() {
  if (S.tab !== "overview") return;
  const key = lrKey();
  const entry = key ? S.scalars[key] : null;
  const groups = (S.run.optimizer && S.run.optimizer.param_groups) || [];
  const lrs = [...new Set(groups.map((g) => g.lr).filter((v) => v !== undefined))];
  $("lr-hint").textContent = key
    ? `"${key}" per optimizer step (the monitor logs each param group's lr).`
    : lrs.length
      ? `Not logged per step; the optimizer started at lr ${lrs.join(", ")}. Log it with mon.log(lr=...) to see a schedule.`
      : "Not logged: mon.log(lr=scheduler.get_last_lr()[0]) draws it here.";
  const series = entry ? [{ name: key, x: entry.steps, y: entry.values }] : [];
  renderLines($("lr-plot"), series, { yTitle: key || "lr", xRange: S.range, empty: "No learning rate logged", toZero: true });
}

export function drawOverview() {
  renderHealth();
  drawScalars();
  drawLr();
}

// Live points are drawn in one batch at most every LIVE_DRAW_MS. A training at
// every=1 sends ~20 batches a second, each with a loss, an lr and often more
// keys: one Plotly redraw per key and batch kept a 2-core machine's page busy
// for tens of seconds (a page.evaluate waited 35 s for its turn). The page
// must stay responsive however fast the run, and 5 redraws a second look live.
const LIVE_DRAW_MS = 200;
// What the next draw does: `tasks` by name (the header, the alert table — a
// repeat replaces the one before), the loss plot's new points (`scalars`) or a
// full redraw of it for new alert markers (`markers`), the lr plot's points.
const live = { tasks: new Map(), scalars: false, markers: false, lr: false };
// A draw already made (pause) or dropped (leave) leaves nothing marked: the timer's call is then a no-op.
const scheduleLiveDraw = throttle(() => flushLiveDraw(), LIVE_DRAW_MS);

// Runs `fn` on the next live draw, once however often it was asked for.
export function liveDraw(name, fn) {
  live.tasks.set(name, fn);
  scheduleLiveDraw();
}

// A new alert: its marker is drawn on the loss plot on the next live draw.
export function liveMarkers() {
  live.markers = true;
  scheduleLiveDraw();
}

// Drops what a scheduled draw would do: the page is left or reloaded (a load redraws everything).
export function cancelLiveDraw() {
  live.tasks = new Map();
  live.scalars = live.markers = live.lr = false;
}

// Draws what live events brought since the last draw, now (also when the
// user pauses: what arrived before the click is shown, nothing after).
export function flushLiveDraw() {
  const { tasks, scalars, markers, lr } = live;
  cancelLiveDraw();
  for (const fn of tasks.values()) fn();
  if (S.tab !== "overview" || !(scalars || markers || lr)) return;
  // A live trace grows by a point a step; past twice what a fetch returns, the
  // server's downsampled series is fetched again so a long run stays light.
  const keys = [...S.shownKeys, lrKey()].filter(Boolean);
  if (keys.some((k) => S.scalars[k] && S.scalars[k].steps.length > 2 * MAX_POINTS.scalars)) {
    loadOverview(S.gen);
    return;
  }
  if (markers) drawScalars();
  else if (scalars) {
    const traces = S.shownKeys.length + (S.alerts.length ? 1 : 0); // the alert markers come last
    extendOrRedraw($("loss-plot"), S.shownKeys.map((k) => S.scalars[k]), traces, drawScalars);
  }
  if (lr) extendOrRedraw($("lr-plot"), [S.scalars[lrKey()]], 1, drawLr);
}

// Appends to each trace what it lacks, in one extendTraces call, when every
// trace holds a prefix of its entry's points; otherwise redraws the plot.
// Trace i is entries[i] (renderScalars and renderLines put them first) when the
// plot has `traces` traces; a plot drawn for other keys is redrawn.
function extendOrRedraw(gd, entries, traces, redraw) {
  const x = [];
  const y = [];
  const indices = [];
  const consistent =
    gd.data &&
    gd.data.length === traces &&
    entries.every((entry, i) => {
      const trace = gd.data[i];
      if (!trace) return false;
      if (!entry || entry.loading) return true; // a fetch in flight draws it when it lands
      const n = trace.x.length;
      if (n > entry.steps.length || (n > 0 && trace.x[n - 1] !== entry.steps[n - 1])) return false;
      if (n < entry.steps.length) {
        indices.push(i);
        x.push(entry.steps.slice(n));
        y.push(entry.values.slice(n));
      }
      return true;
    });
  if (!consistent) redraw();
  else if (indices.length) Plotly.extendTraces(gd, { x, y }, indices);
}

// A live `scalars` event: the page's data now, the plots on the next live draw.
export function onScalars(event, renderHeader) {
  const keys = S.run.scalar_keys || (S.run.scalar_keys = []);
  if (!keys.includes(event.key)) {
    keys.push(event.key);
    if (!S.shownKeys.length && event.key === "loss") S.shownKeys = ["loss"];
    // The validation loss is shown beside the loss by default (as run.js does for a loaded run),
    // also when its first value arrives after the page loaded.
    else if (/^val_?loss$/i.test(event.key) && !S.shownKeys.includes(event.key)) {
      S.shownKeys = orderedKeys([...S.shownKeys, event.key]);
    }
    renderKeyChips();
  }
  if (event.steps.length) {
    S.run.last_step = Math.max(S.run.last_step ?? 0, ...event.steps);
    if (event.key === "loss") S.run.last_loss = event.values[event.values.length - 1];
    liveDraw("header", renderHeader);
  }
  let entry = S.scalars[event.key];
  if (!entry) {
    if (!S.shownKeys.includes(event.key) && event.key !== lrKey()) return;
    entry = S.scalars[event.key] = { steps: [], values: [], loading: false, pending: [] };
  }
  if (entry.loading) {
    entry.pending.push(event);
    return;
  }
  const added = appendPoints(entry, event.steps, event.values);
  if (!added.steps.length) return;
  if (S.shownKeys.includes(event.key)) live.scalars = true;
  if (event.key === lrKey()) live.lr = true;
  scheduleLiveDraw();
}

// ------------------------------------------------------------------ health

const RANK = Object.fromEntries(SEVERITIES.map((s, i) => [s, i]));

// One line per rule: its worst severity, the layers it named, the first and
// latest step it fired at, and how often.
export function healthSummary(alerts) {
  const byRule = new Map();
  for (const a of alerts) {
    const h = byRule.get(a.rule) || { rule: a.rule, severity: a.severity, layers: [], first: a.step, last: a.last_step ?? a.step, count: 0, remedy: a.remedy };
    if ((RANK[a.severity] ?? 9) < (RANK[h.severity] ?? 9)) h.severity = a.severity;
    if (a.layer && !h.layers.includes(a.layer)) h.layers.push(a.layer);
    h.first = Math.min(h.first, a.step);
    h.last = Math.max(h.last, a.last_step ?? a.step);
    h.count += a.count ?? 1;
    byRule.set(a.rule, h);
  }
  return [...byRule.values()].sort((a, b) => (RANK[a.severity] ?? 9) - (RANK[b.severity] ?? 9) || a.first - b.first);
}

export function renderHealth() {
  const items = healthSummary(S.alerts).map((h) => {
    const layers = h.layers.map((layer) => {
      const button = el("button", { className: "layer-link", text: layer, title: `Show ${layer}'s histogram from step ${h.first}` });
      button.type = "button";
      button.addEventListener("click", () => hooks.openLayer(layer, h.first));
      return button;
    });
    const steps = h.first === h.last ? `at step ${h.first}` : `since step ${h.first} (last ${h.last})`;
    return el(
      "li",
      {},
      severityBadge(h.severity),
      el("span", { className: "rule", text: h.rule }),
      layers.length ? el("span", {}, ...layers) : el("span", { className: "muted", text: "whole model" }),
      el("span", { className: "since", text: `${steps} · ×${h.count}`, title: h.remedy || "" }),
    );
  });
  $("health-list").replaceChildren(...items);
  $("health-empty").hidden = items.length > 0;
}
