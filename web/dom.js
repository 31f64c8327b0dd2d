// Small DOM helpers shared by the views. Data only ever enters the page as
// textContent (or as an attribute value the browser does not interpret):
// nothing here, or anywhere in the dashboard, assigns innerHTML.

import { SEVERITIES } from "./api.js";

const STATUSES = new Set(["running", "finished", "crashed"]);

export const $ = (id) => document.getElementById(id);

export function el(tag, { className, text, title } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (title) node.title = String(title);
  for (const child of children) if (child) node.append(child);
  return node;
}

export function setText(id, text) {
  $(id).textContent = text === undefined || text === null ? "—" : String(text);
}

// The class comes from a fixed set, never from the data itself.
export function statusClass(status) {
  return `badge status-${STATUSES.has(status) ? status : "unknown"}`;
}

export function statusBadge(status) {
  return el("span", { className: statusClass(status), text: status ?? "unknown" });
}

export function severityBadge(severity) {
  const cls = SEVERITIES.includes(severity) ? severity : "unknown";
  return el("span", { className: `badge sev-${cls}`, text: severity ?? "unknown" });
}

// "2 critical · 1 warning" as small coloured counts; zeros are dimmed.
export function alertCounts(counts) {
  const box = el("span", { className: "counts" });
  for (const sev of SEVERITIES) {
    const n = (counts && counts[sev]) || 0;
    box.append(el("span", { className: `count sev-${sev}${n ? "" : " zero"}`, text: n, title: `${n} ${sev}` }));
  }
  return box;
}

export function formatTime(t) {
  if (t === null || t === undefined || t === "") return "—";
  // Seconds since the epoch (the wire's `time`) or an ISO string.
  const date = typeof t === "number" ? new Date(t < 1e12 ? t * 1000 : t) : new Date(t);
  if (Number.isNaN(date.getTime())) return String(t);
  const today = new Date();
  const sameDay = date.toDateString() === today.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleString([], { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = false;
}

export function hideBanner() {
  $("banner").hidden = true;
}
