// RemoteRun's web terminal page: run a script, watch and type into it, browse and replay history.
// Speaks only the wire contract (REST, and the task WebSocket); no framework, no build step.

window.remoterun = { started: true }; // tells index.html's plain-text fallback to stand down

const FINAL = new Set(["success", "failed", "timeout", "cancelled"]);
const STDERR_ON = "\x1b[31m"; // red foreground
const STDERR_OFF = "\x1b[39m"; // default foreground, leaving bold/underline as the script set them
const HISTORY_POLL_MS = 3000;
const PING_MS = 15000;

const $ = (selector) => document.querySelector(selector);
const me = { name: "", role: "viewer", auth: false };
const scripts = new Map(); // name -> GET /scripts entry
let term = null;

// The open task: its socket, and the last output seq shown, so a reconnect neither repeats
// nor loses a frame.
const view = { id: null, task: null, lastSeq: 0, socket: null, done: false, retries: 0,
               timer: null, awaitingPong: false, line: "", outbox: [] };

// --- HTTP ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

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
      convertEol: true, cursorBlink: true, scrollback: 10000, fontSize: 14,
      fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
      theme: { background: "#0f1115", foreground: "#d8dee9", cursor: "#d8dee9" },
    });
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
    this.pre = element.appendChild(el("pre", { className: "plain-terminal" }));
    this.options = {};
    this.cols = 80;
    this.rows = 24;
  }
  write(data) {
    const text = data.replace(/\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\r(?=\n)/g, "");
    this.pre.append(text);
    this.pre.scrollTop = this.pre.scrollHeight;
  }
  reset() { this.pre.textContent = ""; }
  focus() {}
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
  Object.assign(view, { id, task: null, lastSeq: 0, done: false, retries: 0, line: "",
                        outbox: [] });
  term.reset();
  notice("");
  if (push) history.pushState(null, "", `/?task=${encodeURIComponent(id)}`);
  markCurrentRow();
  let task;
  try {
    task = await api(`/tasks/${encodeURIComponent(id)}`);
  } catch (error) {
    $("#task-title").textContent = `Task ${id}`;
    notice(error.message);
    return;
  }
  if (view.id !== id) return; // another task was opened meanwhile
  showTask(task);
  connect();
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/tasks/${view.id}/ws?since=${view.lastSeq}`;
  const socket = new WebSocket(url);
  view.socket = socket;
  view.awaitingPong = false;
  socket.onopen = () => view.outbox.splice(0).forEach((m) => socket.send(JSON.stringify(m)));
  // Events of a socket we have already given up on are stale: ignore them.
  socket.onmessage = (event) => view.socket === socket && onFrame(JSON.parse(event.data));
  socket.onclose = (event) => view.socket === socket && onDrop(`connection closed (${event.code})`);
}

function disconnect() {
  clearTimeout(view.timer);
  const socket = view.socket;
  view.socket = null;
  if (socket) socket.close(1000, "client left");
}

function onDrop(reason) {
  disconnect();
  if (view.done) return;
  const delay = Math.min(5000, 250 * 2 ** view.retries++);
  notice(`${reason}; reconnecting…`);
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
      showTask(frame.task);
      sendSize();
      break;
    case "output":
      if (frame.seq <= view.lastSeq) return; // already shown before a reconnect
      view.lastSeq = frame.seq;
      term.write(frame.stream === "stderr" ? STDERR_ON + frame.data + STDERR_OFF : frame.data);
      break;
    case "status":
      showTask({ ...view.task, status: frame.status, attempt: frame.attempt });
      sendSize();
      break;
    case "exit":
      view.done = true;
      showTask({ ...view.task, status: frame.status, exit_code: frame.exit_code }, frame.duration);
      refreshHistory();
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
  if (view.awaitingPong) return onDrop("no answer from the server");
  view.awaitingPong = true;
  send({ type: "ping" });
}

function showTask(task, duration) {
  view.task = task;
  // A PTY sends "\r\n" itself; pipes send bare "\n", which a terminal must also return on.
  term.options.convertEol = !task.pty;
  $("#task-title").textContent = `${task.script} · ${task.id.slice(0, 8)}`;
  $("#task-status").textContent = task.status;
  $("#task-status").className = `status ${task.status}`;
  const took = duration ?? seconds(task);
  const parts = [task.exit_code == null ? "" : `exit ${task.exit_code}`,
                 FINAL.has(task.status) && took != null ? formatSeconds(took) : ""];
  $("#task-exit").textContent = parts.filter(Boolean).join(" · ");
  $("#cancel").disabled = FINAL.has(task.status) || me.role === "viewer";
  for (const [selector, href] of [["#task-link", `/?task=${task.id}`],
                                  ["#task-download", `/tasks/${task.id}/output`]]) {
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

// --- The run form -------------------------------------------------------------------------

async function loadScripts() {
  const body = await api("/scripts");
  const select = $("#script");
  const filter = $("#filter-script");
  for (const script of body.scripts) {
    scripts.set(script.name, script);
    const label = script.runnable ? script.name : `${script.name} (not allowed)`;
    select.append(el("option", { value: script.name, textContent: label,
                                 disabled: !script.runnable }));
    filter.append(el("option", { value: script.name, textContent: script.name }));
  }
  const first = body.scripts.find((s) => s.runnable);
  if (first) select.value = first.name;
  $("#run").hidden = !first; // a viewer, or a token allowed no script here
  renderParams();
}

function renderParams() {
  const script = scripts.get($("#script").value);
  $("#script-help").textContent = script?.description ?? "";
  $("#run").timeout.placeholder = script?.timeout ? `${script.timeout} (script's)` : "default";
  const fields = !script ? [] : script.params === null ? [freeFormField()]
    : script.params.map(paramField);
  $("#params").replaceChildren(...fields);
  $("#run-error").textContent = "";
}

function freeFormField() {
  const input = el("textarea", { name: "free", rows: 3, placeholder: "key=value, one a line" });
  return el("label", { className: "param" }, "Params", input, errorSlot("params"));
}

function paramField(param) {
  let input;
  if (param.enum) {
    input = el("select");
    if (param.default == null) input.append(el("option", { value: "", textContent: "—" }));
    param.enum.forEach((value, i) => input.append(el("option", {
      value: String(i), textContent: String(value), selected: value === param.default })));
  } else if (param.type === "boolean") {
    input = el("input", { type: "checkbox", checked: param.default === true });
  } else {
    const numeric = param.type === "integer" || param.type === "number";
    input = el("input", {
      type: param.secret ? "password" : numeric ? "number" : "text",
      value: param.default ?? "",
      autocomplete: param.secret ? "new-password" : "off",
      title: param.pattern ? `must match ${param.pattern}` : "",
    });
    if (numeric) input.step = param.type === "integer" ? "1" : "any";
    if (param.min != null) input.min = param.min;
    if (param.max != null) input.max = param.max;
  }
  input.name = `param-${param.name}`;
  input.required = param.required && param.type !== "boolean";
  const title = param.required ? `${param.name} *` : param.name;
  const help = param.description ? el("small", { textContent: param.description }) : "";
  const cls = param.type === "boolean" ? "param check" : "param";
  return el("label", { className: cls }, title, input, help, errorSlot(`params.${param.name}`));
}

function errorSlot(field) {
  return el("span", { className: "error", dataset: { field } });
}

function readParams(script, form) {
  if (script.params === null) {
    const params = {};
    for (const line of form.free.value.split("\n").filter((l) => l.trim())) {
      const [key, ...value] = line.split("=");
      params[key.trim()] = value.join("="); // free-form values are strings
    }
    return params;
  }
  const params = {};
  for (const param of script.params) {
    const input = form.elements[`param-${param.name}`];
    if (param.type === "boolean") params[param.name] = input.checked;
    else if (input.value === "") continue; // the server fills in defaults
    else if (param.enum) params[param.name] = param.enum[Number(input.value)];
    else if (param.type === "string") params[param.name] = input.value;
    else params[param.name] = Number(input.value);
  }
  return params;
}

async function submitRun(event) {
  event.preventDefault();
  const form = event.target;
  const script = scripts.get(form.script.value);
  for (const slot of form.querySelectorAll(".error")) slot.textContent = "";
  if (!script) return;
  if (!form.reportValidity()) return;
  const body = { script: script.name, params: readParams(script, form),
                 priority: Number(form.priority.value) || 0,
                 pty: form.pty.checked, interactive: form.interactive.checked };
  if (form.timeout.value) body.timeout = Number(form.timeout.value);
  try {
    const task = await api("/tasks", { method: "POST", body });
    await openTask(task.id);
    refreshHistory();
    term.focus();
  } catch (error) {
    $("#run-error").textContent = error.message;
    for (const { field, message } of error.body?.details ?? []) {
      const slot = form.querySelector(`.error[data-field="${CSS.escape(field)}"]`);
      if (slot) slot.textContent = message;
      else $("#run-error").textContent += ` — ${field}: ${message}`;
    }
  }
}

// --- History ------------------------------------------------------------------------------

let historyAsked = 0; // answers to older requests (other filters) are dropped

async function refreshHistory() {
  const asked = ++historyAsked;
  const query = new URLSearchParams({ limit: "50" });
  if ($("#filter-status").value) query.set("status", $("#filter-status").value);
  if ($("#filter-script").value) query.set("script", $("#filter-script").value);
  try {
    const { tasks } = await api(`/tasks?${query}`);
    if (asked !== historyAsked) return;
    $("#tasks").replaceChildren(...tasks.map(taskRow));
    markCurrentRow();
  } catch (error) {
    notice(`history: ${error.message}`);
  }
}

function taskRow(task) {
  const created = new Date(task.created_at);
  const took = seconds(task);
  const row = el("tr", { tabIndex: 0, dataset: { id: task.id } },
    el("td", {}, el("span", { className: `status ${task.status}`, textContent: task.status })),
    el("td", { textContent: task.script }),
    el("td", { textContent: task.submitted_by }),
    el("td", { textContent: formatWhen(created), title: created.toLocaleString() }),
    el("td", { textContent: took == null ? "" : formatSeconds(took) }),
    el("td", {}, el("a", { href: `/tasks/${task.id}/output`, download: "", textContent: "log",
                           title: "Download the log" })));
  row.addEventListener("click", (event) => event.target.closest("a") || openTask(task.id));
  row.addEventListener("keydown", (event) => event.key === "Enter" && openTask(task.id));
  return row;
}

function markCurrentRow() {
  for (const row of $("#tasks").rows) row.classList.toggle("current", row.dataset.id === view.id);
}

async function pollHistory() {
  if (!document.hidden) await refreshHistory();
  setTimeout(pollHistory, HISTORY_POLL_MS);
}

function seconds(task) {
  if (!task.started_at) return null;
  const end = task.finished_at ? new Date(task.finished_at) : new Date();
  return Math.max(0, (end - new Date(task.started_at)) / 1000);
}

function formatSeconds(s) {
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.round((s % 3600) / 60)}m`;
}

function formatWhen(date) {
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleDateString();
}

// --- Login and start-up -------------------------------------------------------------------

// Resolves once the user logged in; the token becomes an HttpOnly cookie, never stored here.
function login() {
  const form = $("#login");
  form.hidden = false;
  form.token.focus();
  return new Promise((resolve) => {
    form.onsubmit = async (event) => {
      event.preventDefault();
      try {
        await api("/login", { method: "POST", body: { token: form.token.value } });
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
  Object.assign(me, await whoami());
  $("#who").textContent = `${me.name} (${me.role})`;
  $("#logout").hidden = !me.auth;
  $("#app").hidden = false;
  term = window.term = await createTerminal($("#terminal"));
  window.terminalText = terminalText;
  term.onData(onTyped);
  term.onResize(sendSize);
  setInterval(keepAlive, PING_MS);
  wireControls();
  await loadScripts();
  pollHistory();
  if (taskInUrl()) await openTask(taskInUrl(), { push: false });
}

function wireControls() {
  $("#logout").addEventListener("click", async () => {
    await api("/logout", { method: "POST" });
    location.replace("/");
  });
  $("#cancel").addEventListener("click", cancelTask);
  $("#script").addEventListener("change", renderParams);
  $("#run").addEventListener("submit", submitRun);
  $("#run").pty.addEventListener("change", (event) => {
    // A PTY is always interactive (PROTOCOL.md): show it.
    const interactive = $("#run").interactive;
    interactive.disabled = event.target.checked;
    if (event.target.checked) interactive.checked = true;
  });
  $("#filter-status").addEventListener("change", refreshHistory);
  $("#filter-script").addEventListener("change", refreshHistory);
  addEventListener("popstate", () => taskInUrl() && taskInUrl() !== view.id
    && openTask(taskInUrl(), { push: false }));
}

main().catch((error) => {
  console.error(error);
  notice(`The page failed to start: ${error.message}`);
  $("#app").hidden = false;
});
