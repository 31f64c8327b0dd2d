// layerwatch dashboard entry point: hash routing between the runs list (#/),
// a run page (#/run/<id>?tab=...) and the compare view (#/compare?runs=a,b);
// the one /ws/live connection whose events go to the shown view; the pause
// and theme toggles in the top bar.

import { LiveSocket } from "./api.js";
import { refreshPalette } from "./charts.js";
import { compareView } from "./compare.js";
import { $, hideBanner, showBanner } from "./dom.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";

let current = null;
let connection = "connecting";
let paused = false;
let missed = false; // events arrived while paused: catch up on resume

// "#/run/abc?tab=layers" -> {path: "/run/abc", params}.
function parseHash() {
  const hash = location.hash || "#/";
  const at = hash.indexOf("?");
  const path = at < 0 ? hash.slice(1) : hash.slice(1, at);
  return { path, params: new URLSearchParams(at < 0 ? "" : hash.slice(at + 1)) };
}

function decode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

function route() {
  const { path, params } = parseHash();
  const runMatch = /^\/run\/(.+)$/.exec(path);
  const id = runMatch ? decode(runMatch[1]) : null;
  // The same run in another view (back/forward between tabs): no reload.
  if (id !== null && current === runView && runView.id() === id) {
    runView.apply(params).finally(updateIndicator);
    return;
  }
  if (current) current.leave();
  hideBanner();
  if (id !== null) {
    current = runView;
    runView.enter(id, params).finally(updateIndicator);
  } else if (path === "/compare") {
    current = compareView;
    compareView.enter(params);
  } else {
    current = runsView;
    $("crumbs").replaceChildren();
    document.title = "layerwatch";
    runsView.enter();
  }
  window.scrollTo(0, 0);
  updateIndicator();
}

// The dot in the top bar: connecting / live / reconnecting for the socket;
// paused while redrawing is paused; on the page of a run that has ended, it
// says so — nothing more will arrive.
function updateIndicator() {
  const node = $("live-indicator");
  const status = current === runView ? runView.status() : null;
  let state = connection;
  let label = connection;
  if (paused) {
    state = "paused";
    label = "paused";
  } else if (connection === "live" && status && status !== "running") {
    state = "ended";
    label = `run ${status}`;
  }
  node.dataset.state = state;
  node.querySelector(".label").textContent = label;
}

function setPaused(on) {
  paused = on;
  if (on && current && current.pause) current.pause();
  const button = $("pause-toggle");
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "resume" : "pause";
  updateIndicator();
  if (!on && missed && current) {
    missed = false;
    Promise.resolve(current.refresh()).finally(updateIndicator);
  }
}

function setTheme(theme) {
  document.documentElement.dataset.theme = theme;
  try {
    localStorage.setItem("layerwatch-theme", theme);
  } catch {
    /* not persisted; still switched */
  }
  themeChanged();
}

function themeChanged() {
  const theme = document.documentElement.dataset.theme;
  $("theme-toggle").textContent = theme === "light" ? "dark" : "light";
  $("theme-toggle").title = `Switch to the ${theme === "light" ? "dark" : "light"} theme`;
  refreshPalette();
}

new LiveSocket({
  onState(state) {
    connection = state;
    updateIndicator();
  },
  onEvent(event) {
    if (paused) {
      missed = true;
      return;
    }
    if (current) current.onEvent(event);
    if (event.type === "run") updateIndicator();
  },
  // On every (re)connect, catch up on whatever was sent before the socket
  // was open: the first page load races the first connection too.
  onOpen() {
    if (paused) missed = true;
    else if (current) Promise.resolve(current.refresh()).finally(updateIndicator);
  },
});

$("pause-toggle").addEventListener("click", () => setPaused(!paused));
$("theme-toggle").addEventListener("click", () => {
  setTheme(document.documentElement.dataset.theme === "light" ? "dark" : "light");
  if (current) Promise.resolve(current.refresh()).finally(updateIndicator); // plots take the new colours
});
themeChanged();

window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (event) => {
  // A failed fetch nobody awaited: say so on the page instead of failing silently.
  showBanner(`Something went wrong: ${event.reason && event.reason.message ? event.reason.message : event.reason}`);
  event.preventDefault();
});

if (typeof window.Plotly === "undefined") {
  showBanner("Plotly.js did not load from /static/plotly.min.js; the plots cannot be drawn.");
}
route();
