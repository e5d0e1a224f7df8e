// The run form: generated from a script's parameter schema, submitted once per Run (issue 15),
// and filled from a past task by Re-run.

import { t } from "./i18n.js";
import { $, api, el } from "./util.js";

export const scripts = new Map(); // name -> GET /scripts entry
let hooks = { submitted: async () => {} };

export function init(options) {
  hooks = options;
}

export async function loadScripts() {
  const body = await api("/scripts");
  const select = $("#script");
  const filter = $("#filter-script");
  for (const script of body.scripts) {
    scripts.set(script.name, script);
    const label = script.error ? t("form.metadata_error", { name: script.name })
      : script.runnable ? script.name : t("form.not_allowed", { name: script.name });
    select.append(el("option", { value: script.name, textContent: label,
                                 disabled: !script.runnable && !script.error }));
    filter.append(el("option", { value: script.name, textContent: script.name }));
  }
  const first = body.scripts.find((s) => s.runnable);
  if (first) select.value = first.name;
  $("#run").hidden = !first; // a viewer, or a token allowed no script here
  renderParams();
}

export function renderParams() {
  const script = scripts.get($("#script").value);
  // A broken sidecar: the script stays listed, its help says what to fix, Run answers 422.
  $("#script-help").textContent = script?.error ?? script?.description ?? "";
  $("#script-help").classList.toggle("error", Boolean(script?.error));
  $("#run").timeout.placeholder = script?.timeout ? t("form.timeout_script", { s: script.timeout })
    : t("form.default");
  const fields = !script || script.error ? [] : script.params === null ? [freeFormField()]
    : script.params.map(paramField);
  $("#params").replaceChildren(...fields);
  $("#run-error").textContent = "";
}

function freeFormField() {
  const input = el("textarea", { name: "free", rows: 3, placeholder: t("form.free") });
  return el("label", { className: "param" }, t("task.params"), input, errorSlot("params"));
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
      title: param.pattern ? t("form.pattern", { pattern: param.pattern }) : "",
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

// Enter in a field submits the form once: while a submission is in flight (and after it,
// until the terminal has the focus) Run is disabled, so a second Enter cannot repeat it.
let submitting = false;
export const isSubmitting = () => submitting;

export async function submitRun(event) {
  event.preventDefault();
  if (submitting) return;
  const form = event.target;
  const script = scripts.get(form.script.value);
  for (const slot of form.querySelectorAll(".error")) slot.textContent = "";
  if (!script) return;
  if (!form.reportValidity()) return;
  const body = { script: script.name, params: readParams(script, form),
                 priority: Number(form.priority.value) || 0,
                 pty: form.pty.checked, interactive: form.interactive.checked };
  if (form.timeout.value) body.timeout = Number(form.timeout.value);
  submitting = true;
  $("#run-button").disabled = true;
  try {
    const task = await api("/tasks", { method: "POST", body });
    $("#rerun-of").textContent = "";
    await hooks.submitted(task);
  } catch (error) {
    $("#run-error").textContent = error.message;
    for (const { field, message } of error.body?.details ?? []) {
      const slot = form.querySelector(`.error[data-field="${CSS.escape(field)}"]`);
      if (slot) slot.textContent = message;
      else $("#run-error").textContent += ` — ${field}: ${message}`;
    }
  } finally {
    submitting = false;
    $("#run-button").disabled = false;
  }
}

// A PTY is always interactive (PROTOCOL.md): with PTY checked, Interactive shows checked and
// cannot be changed; unchecking PTY gives Interactive back the user's own choice.
export function syncInteractive() {
  const form = $("#run");
  const box = form.interactive;
  if (form.pty.checked) {
    if (!box.disabled) box.dataset.own = box.checked ? "1" : "";
    Object.assign(box, { checked: true, disabled: true });
  } else if (box.disabled) {
    Object.assign(box, { checked: box.dataset.own === "1", disabled: false });
  }
}

// Re-run: the task's script and params in the form, ready to edit and submit. Secret params
// come back as "***": their fields are left empty, to be typed again.
export function rerun(task) {
  const form = $("#run");
  const script = scripts.get(task?.script);
  if (!script) return;
  form.script.value = script.name;
  renderParams();
  const params = task.params ?? {};
  if (script.params === null) {
    form.free.value = Object.entries(params).map(([k, v]) => `${k}=${v}`).join("\n");
  } else {
    for (const param of script.params) {
      const input = form.elements[`param-${param.name}`];
      const value = params[param.name];
      if (!input || value === undefined || param.secret) continue;
      if (param.type === "boolean") input.checked = value === true;
      else if (param.enum) input.value = String(param.enum.indexOf(value));
      else input.value = String(value);
    }
  }
  form.pty.checked = task.pty;
  Object.assign(form.interactive, { disabled: false, checked: task.interactive && !task.pty });
  form.interactive.dataset.own = form.interactive.checked ? "1" : "";
  syncInteractive();
  form.priority.value = String(task.priority);
  form.timeout.value = task.timeout == null ? "" : String(task.timeout);
  const secrets = (script.params ?? []).filter((p) => p.secret).map((p) => p.name);
  $("#rerun-of").textContent = t("form.rerun_of", { script: task.script, id: task.id.slice(0, 8) })
    + (secrets.length ? ` Enter ${secrets.join(", ")} again.` : "");
  form.scrollIntoView({ block: "nearest" });
  (form.querySelector("#params input, #params select, #params textarea") ?? form.script).focus();
}
