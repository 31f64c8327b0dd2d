// The dashboard's only contact with the server: REST fetches, the live
// websocket, and the one escaping helper for text that goes into Plotly.
// Both carry the access token when the server wants one (auth.js).
//
// Names used here (kind, stat, step, layer, param) are the wire schema's
// (client_hook/wire.py), unchanged.

import { askForToken, authHeaders, CLOSE_UNAUTHORIZED, storedToken } from "./auth.js";

export const TENSOR_KINDS = ["weight", "grad", "activation"];
export const STAT_FIELDS = ["mean", "std", "rms", "norm", "min", "max", "nonfinite", "zero_frac", "numel", "update_ratio", "sat_frac"];
export const ACTIVATION_PARAM = "output";
export const HIST_BINS = 32;
export const SEVERITIES = ["critical", "warning", "info"];

// Plotly renders a subset of HTML in hover labels, tick labels and titles.
// Every string that came from a user's model or run goes through this first,
// so `<b>bold</b>` is shown as those eleven characters and never as markup.
export function escapeHtml(value) {
  return String(value ?? "")
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

export class HttpError extends Error {}

// The server's `detail` for a failed response, or "" when it sent none.
async function detailOf(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : "";
  } catch {
    return ""; /* not JSON; the status says enough */
  }
}

// fetch() with the stored token; on 401, ask for a token (once for every
// request that failed together) and try again with it.
export async function apiFetch(url, init = {}) {
  for (;;) {
    const headers = { Accept: "application/json", ...(init.headers || {}), ...authHeaders() };
    const response = await fetch(url, { ...init, headers });
    if (response.status !== 401) return response;
    await askForToken(await detailOf(response));
  }
}

async function getJSON(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, v);
  }
  const qs = query.toString();
  const response = await apiFetch(qs ? `${path}?${qs}` : path);
  if (!response.ok) {
    const detail = await detailOf(response);
    throw new HttpError(`${path} answered HTTP ${response.status}${detail ? `: ${detail}` : ""}`);
  }
  return response.json();
}

const runPath = (id) => `/api/runs/${encodeURIComponent(id)}`;

// Series endpoints take `win`: {start, end, max_points}; the server downsamples
// to max_points (keeping spikes), so a long run costs the same as a short one
// and a zoomed-in window comes back at full resolution.
export const api = {
  runs: () => getJSON("/api/runs"),
  run: (id) => getJSON(runPath(id)),
  scalars: (id, key, win = {}) => getJSON(`${runPath(id)}/scalars`, { key, ...win }),
  heatmap: (id, { kind, stat, param }, win = {}) => getJSON(`${runPath(id)}/heatmap`, { kind, stat, param, ...win }),
  layerStats: (id, { layer, param, kind }, win = {}) => getJSON(`${runPath(id)}/layer_stats`, { layer, param, kind, ...win }),
  histograms: (id, { layer, param, kind }, win = {}) => getJSON(`${runPath(id)}/histograms`, { layer, param, kind, ...win }),
  alerts: (id) => getJSON(`${runPath(id)}/alerts`),
};

// The request window for a shown step range: whole steps around it.
export function stepWindow(xRange, maxPoints) {
  if (!xRange) return { max_points: maxPoints };
  return { start: Math.max(0, Math.floor(xRange[0])), end: Math.ceil(xRange[1]), max_points: maxPoints };
}

// One /ws/live connection for the whole page. Reconnects with exponential
// backoff; `onOpen(reconnected)` lets views catch up on what they missed.
// Browsers cannot set headers on a websocket, so the token goes as ?token=;
// a socket refused for its token asks for one and reconnects at once.
export class LiveSocket {
  constructor({ onEvent, onState, onOpen }) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.onOpen = onOpen;
    this.delay = 500;
    this.opened = false;
    this.ws = null;
    this.connect();
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.onState(this.opened ? "reconnecting" : "connecting");
    const token = storedToken();
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${location.host}/ws/live${query}`);
    } catch {
      this.retry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      const reconnected = this.opened;
      this.opened = true;
      this.delay = 500;
      this.onState("live");
      this.onOpen(reconnected);
    };
    ws.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return; // not ours to judge; the server speaks JSON
      }
      this.onEvent(event);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      if (event.code === CLOSE_UNAUTHORIZED) askForToken(event.reason).then(() => this.connect());
      else this.retry();
    };
    // An error is always followed by close; the retry happens there.
    ws.onerror = () => {};
  }

  retry() {
    this.onState("reconnecting");
    const wait = this.delay;
    this.delay = Math.min(this.delay * 2, 10000);
    setTimeout(() => this.connect(), wait);
  }
}

// Runs `fn` at most once per `ms`, trailing: a burst of calls becomes one call
// about `ms` after the first of them.
export function throttle(fn, ms) {
  let timer = null;
  return () => {
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      fn();
    }, ms);
  };
}
