// layerwatch dashboard entry point: hash routing between the runs list (#/)
// and a run page (#/run/<id>), and the one /ws/live connection whose events
// go to the shown view.

import { LiveSocket } from "./api.js";
import { $, hideBanner, showBanner } from "./dom.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";

let current = null;
let connection = "connecting";

function route() {
  const hash = location.hash || "#/";
  const match = /^#\/run\/(.+)$/.exec(hash);
  let id = null;
  if (match) {
    try {
      id = decodeURIComponent(match[1]);
    } catch {
      id = null;
    }
  }
  if (current) current.leave();
  hideBanner();
  if (id !== null) {
    current = runView;
    runView.enter(id).finally(updateIndicator);
  } else {
    current = runsView;
    $("crumbs").replaceChildren();
    document.title = "layerwatch";
    runsView.enter();
  }
  window.scrollTo(0, 0);
  updateIndicator();
}

// The dot in the top bar: connecting / live / reconnecting for the socket; on
// the page of a run that has ended, it says so — nothing more will arrive.
function updateIndicator() {
  const node = $("live-indicator");
  const status = current === runView ? runView.status() : null;
  let state = connection;
  let label = connection;
  if (connection === "live" && status && status !== "running") {
    state = "ended";
    label = `run ${status}`;
  }
  node.dataset.state = state;
  node.querySelector(".label").textContent = label;
}

new LiveSocket({
  onState(state) {
    connection = state;
    updateIndicator();
  },
  onEvent(event) {
    if (current) current.onEvent(event);
    if (event.type === "run") updateIndicator();
  },
  // On every (re)connect, catch up on whatever was sent before the socket
  // was open: the first page load races the first connection too.
  onOpen() {
    if (current) Promise.resolve(current.refresh()).finally(updateIndicator);
  },
});

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
