// The history: filters kept in the URL, cursor paging both ways, and live updates from
// GET /events (no polling): each transition updates its row, or adds it when it matches.

import { lang, t } from "./i18n.js";
import { $, api, el, formatSeconds, formatWhen, seconds, withKey } from "./util.js";

export const PAGE_SIZE = 25;
export const FILTERS = ["q", "status", "script", "submitted_by", "since", "until"];

const state = { filters: {}, cursor: null, after: null, next: null, prev: null,
                loading: null, held: [] };
let hooks = { open: () => {}, current: () => null };
let asked = 0; // answers to older requests (other filters, other pages) are dropped

export function init(options) {
  hooks = options;
  const form = $("#filters");
  let typing = null;
  form.addEventListener("submit", (event) => event.preventDefault()); // Enter in q: no reload
  form.addEventListener("input", (event) => {
    clearTimeout(typing);
    typing = setTimeout(changed, event.target.type === "search" || event.target.name
      === "submitted_by" ? 300 : 0);
  });
  form.addEventListener("reset", () => setTimeout(changed));
  $("#older").addEventListener("click", () => page({ cursor: state.next }));
  $("#newer").addEventListener("click", () => page({ after: state.prev }));
}

// --- The URL ------------------------------------------------------------------------------

// Local "YYYY-MM-DDTHH:MM" (a datetime-local input's value) to and from RFC 3339 UTC.
const toUtc = (local) => (local ? new Date(local).toISOString() : "");
function toLocal(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return new Date(date - date.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

export function readUrl(params = new URLSearchParams(location.search)) {
  state.filters = {};
  for (const name of FILTERS) if (params.get(name)) state.filters[name] = params.get(name);
  state.cursor = params.get("cursor");
  state.after = state.cursor ? null : params.get("after");
  const form = $("#filters");
  const script = form.elements.script;
  if (state.filters.script && ![...script.options].some((o) => o.value === state.filters.script)) {
    script.append(el("option", { textContent: state.filters.script }));
  }
  for (const name of FILTERS) {
    const value = state.filters[name] ?? "";
    form.elements[name].value = name === "since" || name === "until" ? toLocal(value) : value;
  }
}

// The page's URL for a task (or none), keeping the history's filters and page.
export function urlFor(taskId) {
  const params = new URLSearchParams();
  if (taskId) params.set("task", taskId);
  for (const name of FILTERS) if (state.filters[name]) params.set(name, state.filters[name]);
  if (state.cursor) params.set("cursor", state.cursor);
  else if (state.after) params.set("after", state.after);
  const query = params.toString();
  return query ? `/?${query}` : "/";
}

function changed() {
  const form = $("#filters");
  const before = state.filters;
  state.filters = {};
  for (const name of FILTERS) {
    const raw = form.elements[name].value.trim();
    let value = raw;
    if (name === "since" || name === "until") {
      // The input shows minutes: a time from the URL keeps its seconds while it is unchanged.
      value = before[name] && toLocal(before[name]) === raw ? before[name] : toUtc(raw);
    }
    if (value) state.filters[name] = value;
  }
  page({});
}

function page({ cursor = null, after = null }) {
  Object.assign(state, { cursor, after });
  history.replaceState(history.state, "", urlFor(hooks.current()));
  return refresh();
}

// --- The list -----------------------------------------------------------------------------

export async function refresh() {
  const mine = ++asked;
  const query = new URLSearchParams({ limit: String(PAGE_SIZE), ...state.filters });
  if (state.cursor) query.set("cursor", state.cursor);
  else if (state.after) query.set("after", state.after);
  const done = (state.loading = api(`/tasks?${query}`));
  try {
    const body = await done;
    if (mine !== asked) return;
    Object.assign(state, { next: body.next_cursor, prev: body.prev_cursor });
    $("#tasks").replaceChildren(...body.tasks.map(taskRow));
    $("#older").disabled = !state.next;
    $("#newer").disabled = !state.prev;
    markCurrent();
  } catch (error) {
    if (mine === asked) $("#live").textContent = t("history.failed", { message: error.message });
  } finally {
    if (mine === asked) {
      state.loading = null;
      for (const task of state.held.splice(0)) applyLive(task);
      $("#history-empty").hidden = $("#tasks").rows.length > 0;
    }
  }
}

function taskRow(task) {
  const created = new Date(task.created_at);
  const took = seconds(task);
  const link = el("a", { href: `/?task=${task.id}`, textContent: task.script,
                         title: `${task.script} · ${task.id}` });
  const row = el("tr", { dataset: { id: task.id, created: task.created_at } },
    el("td", {}, el("span", { className: `status ${task.status}`, textContent: t(`status.${task.status}`) })),
    el("td", {}, link),
    el("td", { className: "wide", textContent: task.submitted_by }),
    el("td", { textContent: formatWhen(created), title: created.toLocaleString(lang) }),
    el("td", { className: "wide", textContent: took == null ? "" : formatSeconds(took) }),
    el("td", {}, el("a", { href: withKey(`/tasks/${task.id}/output`), download: "", textContent: t("col.log"),
                           title: t("history.download", { script: task.script }) })));
  row.addEventListener("click", (event) => {
    const target = event.target.closest("a");
    if (target && target !== link) return; // the download
    if (event.ctrlKey || event.metaKey || event.shiftKey) return; // a new tab, as a link does
    event.preventDefault();
    hooks.open(task.id);
  });
  return row;
}

export function markCurrent() {
  for (const row of $("#tasks").rows) {
    const current = row.dataset.id === hooks.current();
    row.classList.toggle("current", current);
    if (current) row.setAttribute("aria-current", "true");
    else row.removeAttribute("aria-current");
  }
}

function matches(task) {
  const f = state.filters;
  if (f.status && task.status !== f.status) return false;
  if (f.script && task.script !== f.script) return false;
  if (f.submitted_by && task.submitted_by !== f.submitted_by) return false;
  if (f.q && !task.script.toLowerCase().includes(f.q.toLowerCase())) return false;
  const created = new Date(task.created_at);
  if (f.since && created < new Date(f.since)) return false;
  if (f.until && created >= new Date(f.until)) return false;
  return true;
}

// A transition from /events: update the task's row, drop it when it no longer matches the
// filters, or add it in its place when it now does and belongs on this page.
export function applyLive(task) {
  if (state.loading) {
    state.held.push(task); // the list being fetched may be older or newer: apply after it
    return;
  }
  const body = $("#tasks");
  const row = body.querySelector(`tr[data-id="${CSS.escape(task.id)}"]`);
  if (!matches(task)) {
    row?.remove();
  } else if (row) {
    row.replaceWith(taskRow(task));
  } else if (!state.prev) { // the newest page: newer tasks go on it
    const later = [...body.rows].find((r) => new Date(r.dataset.created) < new Date(
      task.created_at));
    if (later) body.insertBefore(taskRow(task), later);
    else if (!state.next) body.append(taskRow(task));
  }
  $("#history-empty").hidden = body.rows.length > 0;
  markCurrent();
}
