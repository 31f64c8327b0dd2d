// The run page's overview tab: the loss and any other logged scalar (val_loss
// on the same axes) with alert markers, the learning rate, and the health
// summary — which rules fired, on which layers, since when.

import { api, SEVERITIES } from "./api.js";
import { renderLines, renderScalars } from "./charts.js";
import { $, el, severityBadge } from "./dom.js";
import { hooks, S, win } from "./run_state.js";

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

// A live `scalars` event: the page's data first, the plot only when shown.
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
    renderHeader();
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
  const before = entry.steps.length;
  const added = appendPoints(entry, event.steps, event.values);
  if (!added.steps.length || S.tab !== "overview") return;
  if (event.key === lrKey() && !S.shownKeys.includes(event.key)) {
    drawLr();
    return;
  }
  const index = S.shownKeys.indexOf(event.key);
  if (index < 0) return;
  const gd = $("loss-plot");
  if (before > 0 && gd.data && gd.data[index] && gd.data[index].x.length === before) {
    Plotly.extendTraces(gd, { x: [added.steps], y: [added.values] }, [index]);
  } else {
    drawScalars(); // first points, or the plot and our arrays disagree: redraw
  }
  if (event.key === lrKey()) drawLr();
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
