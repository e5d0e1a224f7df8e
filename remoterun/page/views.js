// Views beside the console: other modules (audit.js, stats.js) add a tab and an element.

import { $, el } from "./util.js";

// Another view (audit.js, stats.js): a tab in #views and its element in #view-area, shown
// instead of the console while its tab is pressed. Returns a function that shows it.
export function addView({ id, label, element }) {
  const tab = el("button", { type: "button", textContent: label, dataset: { view: id } });
  tab.setAttribute("aria-pressed", "false");
  $("#views").append(tab);
  element.dataset.view = id;
  element.hidden = true;
  $("#view-area").append(element);
  return () => showView(id);
}

export function showView(id) {
  for (const part of $("#view-area").children) part.hidden = part.dataset.view !== id;
  for (const tab of $("#views").children) {
    tab.setAttribute("aria-pressed", String(tab.dataset.view === id));
  }
}
