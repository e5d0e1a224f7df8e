// The hooks card for operators and admins: each configured hook (GET /hooks, never a secret)
// and its latest deliveries. Shown only when the caller may list hooks and there is one.

import { apiHeaders, formatTime } from "./util.js";

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function deliveryRow(d) {
  const what = d.task_id ? `task ${d.task_id.slice(0, 8)}` : (d.reason || "");
  const row = element("tr", { className: `hook-${d.result}` },
    [formatTime(d.ts), d.delivery_id || "-", d.result, what]
      .map((text) => element("td", { textContent: text })));
  row.cells[0].title = d.ts;
  if (d.task_id) row.title = `task ${d.task_id}`;
  return row;
}

function hookBlock(hook) {
  const head = element("tr", {}, ["when", "delivery", "result", "task or reason"]
    .map((h) => element("th", { textContent: h })));
  const rows = hook.deliveries.length ? hook.deliveries.map(deliveryRow)
    : [element("tr", {}, [element("td", { colSpan: 4, textContent: "no delivery yet" })])];
  const block = element("div", { className: "hook" }, [
    element("h3", { textContent: `POST /hooks/${hook.name}` }),
    element("p", { textContent:
      `${hook.script} · ${hook.signature} · ${hook.mode}` }),
    element("table", {}, [element("thead", {}, [head]), element("tbody", {}, rows)]),
  ]);
  block.dataset.hook = hook.name;
  return block;
}

async function load(section) {
  const response = await fetch("/hooks", { headers: apiHeaders() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.hooks?.length) {
    section.remove();
    return;
  }
  section.querySelector(".hooks").replaceChildren(...body.hooks.map(hookBlock));
  if (!section.isConnected) (document.querySelector("#app aside") || document.body).append(section);
}

function card() {
  const refresh = element("button", { type: "button", textContent: "Refresh" });
  const section = element("section", { id: "hooks", className: "card" }, [
    element("h2", { textContent: "Hooks" }), refresh, element("div", { className: "hooks" }),
  ]);
  refresh.addEventListener("click", () => load(section));
  return section;
}

async function showIfAllowed() {
  const response = await fetch("/whoami", { headers: apiHeaders() });
  if (!response.ok) return;
  const me = await response.json();
  const existing = document.getElementById("hooks");
  if (me.role !== "admin" && me.role !== "operator") {
    existing?.remove();
    return;
  }
  await load(existing || card());
}

const app = document.getElementById("app");
if (app) {
  // The page shows #app once logged in (or at once with auth off); check the role each time.
  new MutationObserver(() => { if (!app.hidden) showIfAllowed(); })
    .observe(app, { attributes: true, attributeFilter: ["hidden"] });
  if (!app.hidden) showIfAllowed();
}
