// The state of the run page, shared by its parts (run.js and the run_*.js
// panels). `gen` increases on every (re)load so a late answer for an
// earlier one is dropped. `hooks` are filled in by run.js: the panels call
// back into the page through them (open a layer, write the URL).

import { stepWindow } from "./api.js";

export const S = {
  id: null,
  gen: 0,
  run: null,
  tab: "overview",
  scalars: {}, // key -> {steps, values, loading, pending}
  shownKeys: [],
  alerts: [],
  webhooks: {}, // alert id -> {state, delivered, pending, failed}; empty: no webhook column
  heat: { kind: "grad", stat: "norm", param: "weight" },
  frac: "zero_frac", // the dead / saturated heatmap's stat
  heatData: {}, // plot id -> the heatmap it shows (for clicks)
  series: [],
  seriesKey: null, // "layer\u0000param\u0000kind" of the chosen histogram series
  want: null, // {layer, param, kind}: the histogram series asked for (deep link, heatmap or alert click)
  step: null, // the step in focus, marked on the histogram
  range: null, // [x0, x1]: the shown step range, shared by every step plot; null = the whole run
};

export const hooks = {
  openLayer: (_layer, _step, _kind) => {},
  writeUrl: (_push) => {},
};

export const seriesKey = (s) => `${s.layer}\u0000${s.param}\u0000${s.kind}`;

// Points per trace to ask for: about one per pixel column of a wide plot.
export const MAX_POINTS = { scalars: 2000, heatmap: 400, histogram: 300 };

export const win = (kind) => stepWindow(S.range, MAX_POINTS[kind]);
