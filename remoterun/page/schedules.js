// The Schedules view (issue 29): every schedule with its next run and last outcome, pause,
// resume and run now, its slot history with links to the tasks, and a form that makes an API
// schedule, the cron explained in words with its next five instants as one types.

import { api, el, formatTime } from "./util.js";
import { addView } from "./views.js";

const PREVIEW_DELAY_MS = 250;

function cells(row, texts) {
  row.append(...texts.map((text) => (text instanceof Node ? el("td", {}, text)
    : el("td", { textContent: text }))));
  return row;
}

function taskLink(id) {
  return id ? el("a", { href: `/?task=${encodeURIComponent(id)}`, textContent: id.slice(0, 8) })
    : "—";
}

async function history(panel, schedule) {
  const body = await api(`/schedules/${encodeURIComponent(schedule.name)}/runs?limit=50`);
  const rows = body.runs.map((r) => cells(el("tr", { className: `slot-${r.outcome}` }),
    [formatTime(r.slot), r.outcome, taskLink(r.task_id), r.reason || ""]));
  panel.replaceChildren(el("h3", { textContent: `${schedule.name}: slots` }),
    el("table", {}, el("thead", {}, cells(el("tr"), ["slot", "outcome", "task", "reason"])),
      el("tbody", {}, ...(rows.length ? rows : [cells(el("tr"), ["no slot yet"])]))));
}

function actions(schedule, reload, panel, say) {
  const act = async (path, what) => {
    try {
      const answer = await api(`/schedules/${encodeURIComponent(schedule.name)}/${path}`,
        { method: "POST" });
      say(path === "run" ? `${schedule.name}: task ${answer.id.slice(0, 8)} submitted` : what);
      await reload();
    } catch (err) {
      say(`${schedule.name}: ${err.message}`);
    }
  };
  const button = (label, handler) => {
    const b = el("button", { type: "button", textContent: label });
    b.addEventListener("click", handler);
    return b;
  };
  return el("span", { className: "row" },
    schedule.paused ? button("Resume", () => act("resume", `${schedule.name} resumed`))
      : button("Pause", () => act("pause", `${schedule.name} paused`)),
    button("Run now", () => act("run")),
    button("History", () => history(panel, schedule).catch((err) => say(err.message))));
}

function when(s) {
  return `${s.cron ? s.cron : `every ${s.every}`} (${s.timezone})`;
}

async function list(tbody, panel, say) {
  const reload = () => list(tbody, panel, say);
  const body = await api("/schedules");
  tbody.replaceChildren(...body.schedules.map((s) => {
    const row = cells(el("tr", { dataset: { schedule: s.name } }), [s.name, s.script, when(s),
      s.next_runs.length ? formatTime(s.next_runs[0]) : "—",
      s.last ? `${s.last.outcome} ${formatTime(s.last.slot)}` : "—",
      s.paused ? "paused" : s.source]);
    row.append(el("td", {}, actions(s, reload, panel, say)));
    return row;
  }));
  if (!body.schedules.length) tbody.append(cells(el("tr"), ["no schedule"]));
}

function editor(reload, say) {
  const field = (name, placeholder) => el("input", { name, placeholder, ariaLabel: name });
  const name = field("name", "name");
  const script = field("script", "script");
  const cron = field("cron", "cron, e.g. */5 * * * *");
  const zone = field("timezone", "time zone (server's)");
  const words = el("p", { className: "cron-words" });
  const next = el("ol", { className: "cron-next" });
  let timer = null;
  const preview = async () => {
    if (!cron.value.trim()) { words.textContent = ""; next.replaceChildren(); return; }
    const query = new URLSearchParams({ cron: cron.value, n: "5" });
    if (zone.value.trim()) query.set("timezone", zone.value.trim());
    try {
      const found = await api(`/cron/next?${query}`);
      words.textContent = `${found.description} (${found.timezone})`;
      next.replaceChildren(...found.next_runs.map((at) => el("li", { textContent: formatTime(at) })));
    } catch (err) {
      words.textContent = err.body?.details?.map((d) => d.message).join("; ") || err.message;
      next.replaceChildren();
    }
  };
  for (const input of [cron, zone]) {
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(preview, PREVIEW_DELAY_MS); });
  }
  const form = el("form", { className: "schedule-form" },
    el("h3", { textContent: "New schedule" }), name, script, cron, zone,
    el("button", { type: "submit", textContent: "Create" }), words, next);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: name.value.trim(), script: script.value.trim(), cron: cron.value.trim() };
    if (zone.value.trim()) body.timezone = zone.value.trim();
    try {
      await api("/schedules", { method: "POST", body });
      say(`${body.name} created`);
      await reload();
    } catch (err) {
      say(err.body?.details?.map((d) => `${d.field}: ${d.message}`).join("; ") || err.message);
    }
  });
  return form;
}

function view() {
  const tbody = el("tbody");
  const panel = el("div", { className: "schedule-history" });
  const status = el("p", { className: "schedule-status", role: "status" });
  const say = (text) => { status.textContent = text; };
  const reload = () => list(tbody, panel, say).catch((err) => say(err.message));
  const refresh = el("button", { type: "button", textContent: "Refresh" });
  refresh.addEventListener("click", reload);
  const head = cells(el("tr"), ["name", "script", "when", "next", "last", "state", ""]);
  const section = el("section", { id: "schedules", className: "card" },
    el("h2", { textContent: "Schedules" }), refresh, status,
    el("table", {}, el("thead", {}, head), tbody), panel, editor(reload, say));
  return { section, reload };
}

// The tab shows the view (app.js's handler on #views); a click also reads the list again.
const { section, reload } = view();
addView({ id: "schedules", label: "Schedules", element: section });
document.querySelector('#views [data-view="schedules"]').addEventListener("click", reload);
