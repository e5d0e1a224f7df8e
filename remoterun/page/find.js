// Ctrl+F: find in the whole log through GET /tasks/{id}/search, next and previous, each
// match shown wherever it is (the terminal loads the frames around it).

import { t } from "./i18n.js";
import { $, api } from "./util.js";

const PAGE = 1000;
const state = { taskId: null, query: "", matches: [], cursor: null, index: -1, busy: false };
let show = null; // (match) => Promise: the terminal shows the match

export function init({ taskId, showMatch }) {
  show = showMatch;
  const form = $("#find");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    step(event.submitter?.id === "find-prev" ? -1 : 1, taskId());
  });
  $("#find-q").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      step(event.shiftKey ? -1 : 1, taskId());
    } else if (event.key === "Escape") {
      close();
    }
  });
  $("#find-close").addEventListener("click", close);
  addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "f" && taskId()) {
      event.preventDefault();
      form.hidden = false;
      $("#find-q").focus();
      $("#find-q").select();
    }
  }, true);
}

export function reset() {
  Object.assign(state, { taskId: null, query: "", matches: [], cursor: null, index: -1 });
  $("#find-count").textContent = "";
}

function close() {
  $("#find").hidden = true;
  reset();
}

async function step(direction, taskId) {
  const query = $("#find-q").value;
  if (!query || state.busy || !taskId) return;
  state.busy = true;
  try {
    if (query !== state.query || taskId !== state.taskId) {
      Object.assign(state, { taskId, query, matches: [], cursor: null, index: -1 });
      await more();
    } else if (direction > 0 && state.index + 1 >= state.matches.length && state.cursor) {
      await more();
    }
    const count = state.matches.length;
    if (!count) {
      $("#find-count").textContent = t("find.none");
      return;
    }
    state.index = (state.index + direction + count) % count;
    const match = state.matches[state.index];
    $("#find-count").textContent = t("find.count", {
      i: state.index + 1, n: `${count}${state.cursor ? "+" : ""}`, line: match.line });
    await show(match, query);
  } catch (error) {
    $("#find-count").textContent = error.message;
  } finally {
    state.busy = false;
  }
}

// More matches: pages cut short by the server's time budget are followed until one has any.
async function more() {
  const before = state.matches.length;
  do {
    const cursor = state.cursor ? `&cursor=${encodeURIComponent(state.cursor)}` : "";
    const page = await api(`/tasks/${encodeURIComponent(state.taskId)}/search?q=`
      + `${encodeURIComponent(state.query)}&limit=${PAGE}${cursor}`);
    state.matches.push(...page.matches);
    state.cursor = page.next_cursor;
  } while (state.cursor && state.matches.length === before);
}
