// The run page's tables: the alerts (with webhook delivery where a webhook
// is set up) and the model — its module tree in forward order with
// parameter counts, frozen / unused / not-in-optimizer markers, and the
// alerts that name each module.

import { apiFetch, SEVERITIES } from "./api.js";
import { $, el, severityBadge } from "./dom.js";
import { hooks, S } from "./run_state.js";

const SEVERITY_RANK = Object.fromEntries(SEVERITIES.map((s, i) => [s, i]));

// ------------------------------------------------------------------ alerts

// The webhook column shows only where some alert of this run has deliveries.
function webhookCell(summary) {
  if (!summary) return el("td", { className: "mono", text: "—", title: "not sent: below every webhook's minimum severity" });
  const title = `${summary.delivered} delivered · ${summary.pending} pending · ${summary.failed} failed`;
  return el("td", { className: `mono webhook-${summary.state}`, text: summary.state, title });
}

let webhookTimer = null;

// Delivery states come from /api/webhooks/summary; while any is pending, look again every 2 s.
export async function loadWebhooks(gen) {
  clearTimeout(webhookTimer);
  let summary = [];
  try {
    const response = await apiFetch(`/api/webhooks/summary?run_id=${encodeURIComponent(S.id)}`);
    if (response.ok) summary = await response.json();
  } catch {
    /* an extra column: the table is whole without it */
  }
  if (gen !== S.gen) return;
  S.webhooks = Object.fromEntries(summary.map((s) => [s.alert_id, s]));
  renderAlerts();
  if (summary.some((s) => s.state === "pending")) webhookTimer = setTimeout(() => loadWebhooks(gen), 2000);
}

export function stopWebhooks() {
  clearTimeout(webhookTimer);
}

function layerCell(layer, step) {
  if (!layer) return el("td", { className: "mono", text: "—" });
  const button = el("button", { className: "layer-link", text: layer, title: `Show ${layer}'s histogram at step ${step}` });
  button.type = "button";
  button.addEventListener("click", () => hooks.openLayer(layer, step));
  return el("td", {}, button);
}

export function renderAlerts() {
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
      layerCell(a.layer, a.step),
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
  const serious = S.alerts.filter((a) => a.severity !== "info").length;
  $("tab-alert-count").textContent = S.alerts.length ? String(serious || S.alerts.length) : "";
}

// ------------------------------------------------------------------ model

const formatCount = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e4 ? `${(n / 1e3).toFixed(1)}k` : String(n));

function marker(cls, text, title) {
  return el("span", { className: `marker ${cls}`, text, title });
}

export function renderModel() {
  const modules = (S.run.model && S.run.model.modules) || [];
  $("model-empty").hidden = modules.length > 0;
  $("model-table").hidden = modules.length === 0;
  const byLayer = new Map();
  for (const a of S.alerts) {
    if (a.layer) byLayer.set(a.layer, [...(byLayer.get(a.layer) || []), a]);
  }
  let total = 0;
  let trainable = 0;
  const rows = modules.map((m) => {
    const params = m.params || [];
    const numel = params.reduce((n, p) => n + (p.numel || 0), 0);
    total += numel;
    trainable += params.filter((p) => p.requires_grad).reduce((n, p) => n + (p.numel || 0), 0);
    const depth = m.name ? m.name.split(".").length : 0;
    const nameCell = el("td", { className: "module", text: m.name || "(model)" });
    nameCell.style.paddingLeft = `${10 + 16 * depth}px`;
    const markers = [];
    const frozen = params.filter((p) => p.requires_grad === false);
    if (frozen.length) markers.push(marker("frozen", "frozen", `requires_grad=False: ${frozen.map((p) => p.name).join(", ")}`));
    if (m.called === false) markers.push(marker("unused", "unused", "never called in the forward pass"));
    const missing = params.filter((p) => p.requires_grad !== false && p.in_optimizer === false);
    if (missing.length) markers.push(marker("no-opt", "not in optimizer", `trainable but not given to the optimizer: ${missing.map((p) => p.name).join(", ")}`));
    const alertBadges = (byLayer.get(m.name) || []).map((a) => {
      const badge = severityBadge(a.severity);
      badge.textContent = a.rule;
      badge.title = a.message;
      return badge;
    });
    const tr = el(
      "tr",
      { className: m.called === false ? "unused" : "" },
      nameCell,
      el("td", { className: "mono", text: m.type }),
      el("td", { className: "num mono", text: params.length ? formatCount(numel) : "" }),
      el("td", { className: "params-detail", text: params.map((p) => `${p.name} ${JSON.stringify(p.shape ?? [])}`).join("  ") }),
      el("td", {}, ...markers),
      el("td", {}, ...alertBadges),
    );
    tr.dataset.module = m.name;
    return tr;
  });
  $("model-body").replaceChildren(...rows);
  $("model-summary").textContent = modules.length
    ? `${modules.length} modules · ${formatCount(total)} parameters · ${formatCount(trainable)} trainable`
    : "";
}
