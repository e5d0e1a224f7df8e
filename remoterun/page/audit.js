// The audit trail for admins: a card under the history, filled from GET /audit (newest first).
// Separate from app.js on purpose: it only needs the page's #app to be shown, and /whoami.

import { apiHeaders, formatTime } from "./util.js";

const ACTIONS = ["", "submit", "cancel", "signal", "stdin", "attach", "download", "login",
  "logout", "denied", "hook", "hook_denied", "schedule_create", "schedule_update",
  "schedule_delete", "schedule_pause", "schedule_resume", "schedule_run"];

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function card() {
  const filter = element("select", { id: "audit-action", ariaLabel: "Filter by action" },
    ACTIONS.map((a) => element("option", { value: a, textContent: a || "every action" })));
  const refresh = element("button", { type: "button", textContent: "Refresh" });
  const rows = element("tbody", { id: "audit-rows" });
  const more = element("button", { type: "button", textContent: "Older", hidden: true });
  const head = element("tr", {}, ["when", "who", "action", "script", "result", "detail"]
    .map((h) => element("th", { textContent: h })));
  const section = element("section", { id: "audit", className: "card" }, [
    element("h2", { textContent: "Audit" }),
    element("div", { className: "row" }, [filter, refresh]),
    element("table", {}, [element("thead", {}, [head]), rows]),
    more,
  ]);
  let cursor = null;

  async function load(append) {
    const query = new URLSearchParams({ limit: "50" });
    if (filter.value) query.set("action", filter.value);
    if (append && cursor) query.set("cursor", cursor);
    const response = await fetch(`/audit?${query}`, { headers: apiHeaders() });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      rows.replaceChildren(element("tr", {}, [element("td", { colSpan: 6,
        textContent: body.message || `error ${response.status}` })]));
      return;
    }
    if (!append) rows.replaceChildren();
    for (const e of body.events) {
      const cells = [formatTime(e.ts),
        `${e.actor}${e.role ? ` (${e.role})` : ""}${e.address ? ` ${e.address}` : ""}`,
        e.action, e.script || "", e.result, e.detail || (e.task_id || "")];
      const row = element("tr", { className: `audit-${e.result === "ok" ? "ok" : "refused"}` },
        cells.map((text) => element("td", { textContent: text })));
      row.cells[0].title = e.ts; // the exact instant, in UTC
      if (e.task_id) row.title = `task ${e.task_id}`;
      rows.append(row);
    }
    cursor = body.next_cursor;
    more.hidden = !cursor;
  }

  filter.addEventListener("change", () => load(false));
  refresh.addEventListener("click", () => load(false));
  more.addEventListener("click", () => load(true));
  return { section, load };
}

async function showIfAdmin() {
  const response = await fetch("/whoami", { headers: apiHeaders() });
  if (!response.ok) return;
  const me = await response.json();
  const existing = document.getElementById("audit");
  if (me.role !== "admin") {
    existing?.remove();
    return;
  }
  if (existing) return;
  const { section, load } = card();
  (document.querySelector("#app aside") || document.body).append(section);
  await load(false);
}

const app = document.getElementById("app");
if (app) {
  // The page shows #app once logged in (or at once with auth off); check the role each time.
  new MutationObserver(() => { if (!app.hidden) showIfAdmin(); })
    .observe(app, { attributes: true, attributeFilter: ["hidden"] });
  if (!app.hidden) showIfAdmin();
}
