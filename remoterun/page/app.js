// RemoteRun's web terminal page: run a script, watch and type into it, see a task's whole
// story, re-run it, browse and search the history, all live from GET /events (no polling).
// Speaks only the wire contract (REST, the task WebSocket, SSE); no framework, no build step.

import { durationText, exitText, showDetails } from "./details.js";
import * as find from "./find.js";
import * as form from "./form.js";
import * as historyList from "./history.js";
import { t, translate } from "./i18n.js";
import { follow } from "./live.js";
import { $, api, ApiError, el, FINAL, formatSeconds, seconds, sessionKey, withKey } from "./util.js";
import { addView, showView } from "./views.js";
import { trim, windowed, withLines } from "./window.js";

// `started` tells index.html's plain-text fallback to stand down; `addView` and `api` are for
// the other views' modules (see "Views" below).
window.remoterun = { started: true, api, addView };

const STDERR_ON = "\x1b[31m"; // red foreground
const STDERR_OFF = "\x1b[39m"; // default foreground, leaving bold/underline as the script set them
const PING_MS = 15000;
const POSITION_REFRESH_MS = 500;
const TAIL_LINES = 1000; // a task opens on its last lines (?tail=), not its whole log
const LIGHT = matchMedia("(prefers-color-scheme: light)");
// ANSI colours legible on each background (WCAG AA contrast for the usual ones).
const THEMES = {
  dark: { background: "#0f1115", foreground: "#d8dee9", cursor: "#d8dee9",
          selectionBackground: "#35507a", black: "#5c6370", red: "#ff7b72", green: "#56d364",
          yellow: "#e3b341", blue: "#79c0ff", magenta: "#d2a8ff", cyan: "#56d4dd",
          white: "#d8dee9", brightBlack: "#8b949e", brightRed: "#ffa198",
          brightGreen: "#7ee787", brightYellow: "#f2cc60", brightBlue: "#a5d6ff",
          brightMagenta: "#e2c5ff", brightCyan: "#b3f0ff", brightWhite: "#ffffff" },
  light: { background: "#fbfbfc", foreground: "#1d2129", cursor: "#1d2129",
           selectionBackground: "#b8d3f5", black: "#1d2129", red: "#b3202f", green: "#1a6b34",
           yellow: "#7a5200", blue: "#0b57b8", magenta: "#8e2f9e", cyan: "#0b6670",
           white: "#545b68", brightBlack: "#545b68", brightRed: "#a0111f",
           brightGreen: "#116329", brightYellow: "#6a4700", brightBlue: "#0a4ea6",
           brightMagenta: "#7a1f8a", brightCyan: "#09575f", brightWhite: "#1d2129" },
};

const me = { name: "", role: "viewer", auth: false };
const { scripts } = form;
let term = null;

// The open task: its socket, and the last output seq shown, so a reconnect neither repeats
// nor loses a frame; its transitions, for the attempts table.
// `frames` are those the terminal holds (window.js bounds them); `following`: the window
// reaches the live end and the socket feeds it, or (false) the user is reading older output.
const view = { id: null, task: null, events: [], lastSeq: 0, socket: null, done: false,
               retries: 0, timer: null, awaitingPong: false, line: "", outbox: [],
               positionTimer: null, frames: [], following: true, loading: false };

function notice(text) {
  $("#notice").textContent = text;
}

// --- Terminal -----------------------------------------------------------------------------

async function createTerminal(element) {
  try {
    const [{ Terminal }, { FitAddon }] = await Promise.all([
      import("/vendor/xterm/lib/xterm.mjs"),
      import("/vendor/xterm-addon-fit/lib/addon-fit.mjs"),
    ]);
    const xterm = new Terminal({
      convertEol: true, cursorBlink: true, scrollback: 20000, fontSize: 14, lineHeight: 1.2,
      fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
      theme: LIGHT.matches ? THEMES.light : THEMES.dark,
    });
    LIGHT.addEventListener("change", () => {
      xterm.options.theme = LIGHT.matches ? THEMES.light : THEMES.dark;
    });
    xterm.attachCustomKeyEventHandler(terminalKey);
    const fit = new FitAddon();
    xterm.loadAddon(fit);
    xterm.open(element);
    new ResizeObserver(() => fit.fit()).observe(element);
    fit.fit();
    return xterm;
  } catch (error) {
    console.warn("xterm.js did not load; showing output as plain text", error);
    return new PlainTerminal(element);
  }
}

// Stands in for xterm.js when it cannot load: output as text, colours dropped, no input.
class PlainTerminal {
  constructor(element) {
    this.pre = element.appendChild(el("pre", { className: "plain-terminal", tabIndex: 0 }));
    this.options = {};
    this.cols = 80;
    this.rows = 24;
  }
  write(data, done) {
    const text = data.replace(/\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\r(?=\n)/g, "");
    this.pre.append(text);
    this.pre.scrollTop = this.pre.scrollHeight;
    done?.();
  }
  reset() { this.pre.textContent = ""; }
  focus() { this.pre.focus(); }
  onData() {}
  onResize() {}
}

// The terminal's text, wrapped rows joined back into their lines (tests read it too).
function terminalText() {
  if (!term.buffer) return term.pre.textContent;
  const buffer = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) {
    const line = buffer.getLine(i);
    const text = line.translateToString(true);
    if (line.isWrapped && lines.length) lines[lines.length - 1] += text;
    else lines.push(text);
  }
  return lines.join("\n").trimEnd();
}

// --- The open task ------------------------------------------------------------------------

async function openTask(id, { push = true } = {}) {
  disconnect();
  Object.assign(view, { id, task: null, events: [], lastSeq: 0, done: false, retries: 0,
                        line: "", outbox: [], frames: [], following: true });
  term.reset();
  find.reset();
  $("#to-end").hidden = true;
  notice("");
  if (push) history.pushState(null, "", historyList.urlFor(id));
  historyList.markCurrent();
  let task, events;
  try {
    const path = `/tasks/${encodeURIComponent(id)}`;
    [task, { events }] = await Promise.all([api(path), api(`${path}/events`)]);
  } catch (error) {
    $("#task-title").textContent = t("task.title", { id });
    notice(error.message);
    return;
  }
  if (view.id !== id) return; // another task was opened meanwhile
  for (const event of events) addEvent(event);
  showTask(task);
  connect();
}

function addEvent(event) {
  if (event && !view.events.some((e) => e.id === event.id)) {
    view.events.push(event);
    view.events.sort((a, b) => a.id - b.id);
  }
}

// A transition from GET /events: the history's row, and the open task's story.
function onLive(task) {
  historyList.applyLive(task);
  if (task.id === view.id && view.task) {
    addEvent(task.event);
    const { event, ...fields } = task;
    showTask({ ...view.task, ...fields });
    if (task.status === "pending") refreshPosition(); // a retry queued again
  } else if (view.task?.status === "pending") {
    // Another task moved: the open one's place in the queue may have changed.
    clearTimeout(view.positionTimer);
    view.positionTimer = setTimeout(refreshPosition, POSITION_REFRESH_MS);
  }
}

async function refreshPosition() {
  const id = view.id;
  if (view.task?.status !== "pending") return;
  try {
    const task = await api(`/tasks/${encodeURIComponent(id)}`);
    if (view.id === id && view.task?.status === "pending") showTask({ ...view.task, ...task });
  } catch (error) {
    notice(error.message);
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const from = view.lastSeq ? `since=${view.lastSeq}` : `tail=${TAIL_LINES}`;
  const url = withKey(`${scheme}://${location.host}/tasks/${view.id}/ws?${from}`);
  const socket = new WebSocket(url);
  view.socket = socket;
  view.awaitingPong = false;
  socket.onopen = () => view.outbox.splice(0).forEach((m) => socket.send(JSON.stringify(m)));
  // Events of a socket we have already given up on are stale: ignore them.
  socket.onmessage = (event) => view.socket === socket && onFrame(JSON.parse(event.data));
  socket.onclose = (event) => view.socket === socket && onDrop(t("closed", { code: event.code }));
}

function disconnect() {
  clearTimeout(view.timer);
  const socket = view.socket;
  view.socket = null;
  if (socket) socket.close(1000, "client left");
}

function onDrop(reason) {
  disconnect();
  if (view.done || !view.following) return;
  const delay = Math.min(5000, 250 * 2 ** view.retries++);
  notice(t("reconnecting", { reason }));
  view.timer = setTimeout(reconnect, delay);
}

async function reconnect() {
  const id = view.id;
  try {
    await api(`/tasks/${id}`); // a vanished task or an expired login is not retried forever
  } catch (error) {
    if (error instanceof ApiError && error.status < 500) return notice(error.message);
  }
  if (view.id === id && !view.socket) connect(); // unless another task was opened meanwhile
}

function onFrame(frame) {
  view.awaitingPong = false;
  switch (frame.type) {
    case "task":
      view.retries = 0;
      notice("");
      showTask({ ...view.task, ...frame.task }); // keeping the queue_position REST gave
      sendSize();
      break;
    case "output":
      if (frame.seq <= view.lastSeq) return; // already shown before a reconnect
      view.lastSeq = frame.seq;
      view.frames.push(withLines(frame));
      trim(view.frames, true);
      term.write(frameText(frame));
      break;
    case "status":
      showTask({ ...view.task, status: frame.status, attempt: frame.attempt,
                 ...(frame.status === "pending" ? {} : { queue_position: undefined }) });
      sendSize();
      break;
    case "exit":
      view.done = true;
      showTask({ ...view.task, status: frame.status, exit_code: frame.exit_code }, frame.duration);
      break;
    case "error":
      notice(`${frame.error}: ${frame.message}`);
      break;
  }
}

// Keys typed while the socket (re)connects wait for it rather than vanish.
function send(message) {
  if (view.socket?.readyState === WebSocket.OPEN) view.socket.send(JSON.stringify(message));
  else if (!view.done) view.outbox.push(message);
}

// A dead network does not always close a socket; a ping left unanswered does.
function keepAlive() {
  if (view.socket?.readyState !== WebSocket.OPEN) return;
  if (view.awaitingPong) return onDrop(t("no_answer"));
  view.awaitingPong = true;
  send({ type: "ping" });
}

function showTask(task, duration) {
  view.task = task;
  // A PTY sends "\r\n" itself; pipes send bare "\n", which a terminal must also return on.
  term.options.convertEol = !task.pty;
  $("#task-title").textContent = `${task.script} · ${task.id.slice(0, 8)}`;
  $("#task-status").textContent = t(`status.${task.status}`);
  $("#task-status").className = `status ${task.status}`;
  $("#task-queue").textContent = task.status === "pending" && task.queue_position != null
    ? t("task.queue", { n: task.queue_position }) : "";
  const took = duration ?? seconds(task);
  const parts = [task.exit_code == null ? "" : t("task.exit", { code: exitText(task.exit_code) }),
                 FINAL.has(task.status) && took != null ? formatSeconds(took) : ""];
  $("#task-exit").textContent = parts.filter(Boolean).join(" · ");
  $("#cancel").disabled = FINAL.has(task.status) || me.role === "viewer";
  $("#rerun").disabled = $("#run").hidden || !scripts.get(task.script)?.runnable;
  $("#term-keys").textContent = t(ptyLive() ? "keys.leave_pty" : "keys.leave");
  showDetails(task, view.events);
  for (const [selector, href] of [["#task-link", `/?task=${task.id}`],
                                  ["#task-download", withKey(`/tasks/${task.id}/output`)]]) {
    Object.assign($(selector), { href, hidden: false });
  }
  if (task.error) notice(task.error);
}

function canType() {
  const task = view.task;
  return task && (task.pty || task.interactive) && !FINAL.has(task.status)
    && me.role !== "viewer";
}

function sendSize() {
  if (canType() && view.task.pty && view.task.status === "running") {
    send({ type: "resize", cols: term.cols, rows: term.rows });
  }
}

function onTyped(data) {
  if (!canType()) return;
  if (view.task.pty) send({ type: "stdin", data }); // the PTY echoes, edits, and turns ^C into INT
  else cooked(data);
}

// Pipe tasks have no terminal driver: echo, edit and send whole lines here, as a cooked tty
// would; ^C sends INT to the process group, ^D ends the input.
function cooked(data) {
  if (data.startsWith("\x1b")) return; // arrows and function keys mean nothing to a pipe
  for (const ch of data) {
    if (ch === "\x03") {
      view.line = "";
      term.write("^C\r\n");
      send({ type: "signal", signal: "INT" });
    } else if (ch === "\x04") {
      if (view.line) send({ type: "stdin", data: view.line });
      view.line = "";
      send({ type: "eof" });
    } else if (ch === "\r" || ch === "\n") {
      send({ type: "stdin", data: `${view.line}\n` });
      view.line = "";
      term.write("\r\n");
    } else if (ch === "\x7f" || ch === "\b") {
      if (!view.line) continue;
      view.line = [...view.line].slice(0, -1).join("");
      term.write("\b \b");
    } else if (ch >= " ") {
      view.line += ch;
      term.write(ch);
    }
  }
}

// The new status arrives on the socket; the response may lag behind it, so it is not shown.
async function cancelTask() {
  $("#cancel").disabled = true;
  try {
    await api(`/tasks/${view.id}/cancel`, { method: "POST" });
  } catch (error) {
    notice(error.message);
  }
}

// --- Reading a log larger than the tab holds (window.js) ------------------------------------

function frameText(frame) {
  return frame.stream === "stderr" ? STDERR_ON + frame.data + STDERR_OFF : frame.data;
}

// --- Keyboard -----------------------------------------------------------------------------

function ptyLive() {
  return Boolean(view.task?.pty && view.task.status === "running" && canType());
}

// Esc leaves the terminal; in a live PTY programs need Esc, so there it is Shift+Esc.
function terminalKey(event) {
  if (event.type !== "keydown" || event.key !== "Escape") return true;
  if (ptyLive() && !event.shiftKey) return true;
  leaveTerminal();
  return false;
}

function leaveTerminal() {
  const next = [$("#rerun"), $("#cancel"), $("#filter-q")].find((b) => !b.disabled);
  next.focus();
}

function globalKey(event) {
  const inTerminal = $("#terminal").contains(document.activeElement);
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !inTerminal) {
    event.preventDefault();
    if (!$("#run").hidden && !form.isSubmitting()) $("#run").requestSubmit();
  } else if (event.key === "Escape" && inTerminal && !term.buffer) {
    leaveTerminal(); // the plain-text stand-in has no key handler of its own
  }
}

// --- Login and start-up -------------------------------------------------------------------

// Resolves once the user logged in; the token becomes an HttpOnly cookie, never stored here,
// and the answer's session key is kept in this origin's storage (util.js says why).
function login() {
  const form = $("#login");
  form.hidden = false;
  form.token.focus();
  return new Promise((resolve) => {
    form.onsubmit = async (event) => {
      event.preventDefault();
      try {
        const answer = await api("/login", { method: "POST", body: { token: form.token.value } });
        sessionKey.set(answer.session_key);
        form.reset();
        form.hidden = true;
        resolve();
      } catch (error) {
        $("#login-error").textContent = error.message;
      }
    };
  });
}

async function whoami() {
  for (;;) {
    try {
      return await api("/whoami");
    } catch (error) {
      if (error.status !== 401) throw error;
      await login();
    }
  }
}

function taskInUrl() {
  return new URLSearchParams(location.search).get("task");
}

async function main() {
  translate();
  Object.assign(me, await whoami());
  $("#who").textContent = `${me.name} (${me.role})`;
  $("#logout").hidden = !me.auth;
  $("#app").hidden = false;
  term = window.term = await createTerminal($("#terminal"));
  window.terminalText = terminalText;
  const reading = windowed({ term, view, connect, disconnect, notice, frameText });
  const { onScrolled, showMatch, toEnd } = reading;
  window.visibleText = reading.visibleText;
  term.onData(onTyped);
  if (term.onScroll) term.onScroll(() => onScrolled());
  $("#terminal").addEventListener("wheel", (event) => {
    if (event.deltaY < 0 || !view.following) setTimeout(() => onScrolled(true), 0);
  }, { passive: true });
  find.init({ taskId: () => view.id, showMatch });
  $("#to-end").addEventListener("click", toEnd);
  term.onResize(sendSize);
  setInterval(keepAlive, PING_MS);
  setInterval(tick, 1000);
  historyList.init({ open: (id) => openTask(id), current: () => view.id });
  form.init({ submitted: async (task) => {
    term.focus(); // so that a second Enter goes to the terminal, not to Run
    await openTask(task.id);
  } });
  wireControls();
  const live = follow(onLive); // first: what changes while the list loads is applied after it
  await form.loadScripts();
  historyList.readUrl();
  await Promise.race([live, new Promise((resolve) => setTimeout(resolve, 3000))]);
  await historyList.refresh();
  if (taskInUrl()) await openTask(taskInUrl(), { push: false });
}

// A running task's duration goes on without asking the server.
function tick() {
  if (view.task?.status === "running" && $("#task-duration")) {
    $("#task-duration").textContent = durationText(view.task);
  }
}

function wireControls() {
  $("#logout").addEventListener("click", async () => {
    try {
      await api("/logout", { method: "POST" });
    } finally {
      sessionKey.set(null);
      location.replace("/");
    }
  });
  $("#cancel").addEventListener("click", cancelTask);
  $("#rerun").addEventListener("click", () => view.task && form.rerun(view.task));
  $("#script").addEventListener("change", () => {
    $("#rerun-of").textContent = "";
    form.renderParams();
  });
  $("#run").addEventListener("submit", form.submitRun);
  $("#run").pty.addEventListener("change", form.syncInteractive);
  $("#views").addEventListener("click", (event) => {
    const tab = event.target.closest("button[data-view]");
    if (tab) showView(tab.dataset.view);
  });
  addEventListener("keydown", globalKey);
  addEventListener("popstate", () => {
    historyList.readUrl();
    historyList.refresh();
    if (taskInUrl() && taskInUrl() !== view.id) openTask(taskInUrl(), { push: false });
  });
}

main().catch((error) => {
  console.error(error);
  notice(t("failed_start", { message: error.message }));
  $("#app").hidden = false;
});
