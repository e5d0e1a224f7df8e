// The open task's whole story beside its terminal: facts, params, each attempt, downloads.

import { scripts } from "./form.js";
import { lang, t } from "./i18n.js";
import { $, el, FINAL, formatBytes, formatSeconds, formatTime, seconds, withKey } from "./util.js";

// Linux's signal numbers, for exit codes -N (the task was killed by signal N).
const SIGNALS = { 1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP",
  6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV",
  12: "SIGUSR2", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ" };

// An exit code as people read it: "SIGTERM (-15)" for a signal, the number otherwise.
export function exitText(code) {
  if (code == null) return "—";
  return code < 0 ? `${SIGNALS[-code] ?? t("fact.signal", { n: -code })} (${code})` : String(code);
}

// The timeout the run had: the submission's, else the script's, else the server's default.
function timeoutText(task) {
  if (task.timeout != null) return t("dur.s", { s: task.timeout });
  const own = scripts.get(task.script)?.timeout;
  return own != null ? t("fact.timeout_script", { s: own }) : t("fact.timeout_server");
}

// Each attempt from the task's transitions: it starts when the task goes running and ends at
// the next transition out of running (a retry, or the final state).
export function attempts(events) {
  const list = [];
  for (const event of events) {
    if (event.new_status === "running") {
      list.push({ attempt: event.attempt, start: event.ts, end: null, exitCode: null,
                  error: null, outcome: "running" });
    } else if (event.old_status === "running" && list.length) {
      Object.assign(list[list.length - 1], {
        end: event.ts, exitCode: event.exit_code, error: event.detail,
        outcome: event.new_status === "pending" ? "retried" : event.new_status });
    }
  }
  return list;
}

const clock = (iso) => new Date(iso).toLocaleTimeString(lang);

function fact(term, value, id) {
  const dd = el("dd", { textContent: value ?? "—" });
  if (id) dd.id = id;
  return [el("dt", { textContent: term }), dd];
}

const outcomeText = (outcome) => t(outcome === "retried" ? "fact.retried" : `status.${outcome}`);

export function durationText(task) {
  const took = seconds(task);
  return took == null ? "—" : formatSeconds(took);
}

export function showDetails(task, events) {
  $("#task-info").hidden = false;
  const tries = task.max_retries + 1;
  const facts = [
    fact(t("fact.status"), t(`status.${task.status}`)),
    task.status === "pending" && task.queue_position != null
      ? fact(t("fact.queue"), `#${task.queue_position}`) : [],
    fact(t("fact.attempt"), tries > 1 ? t("fact.attempt_of", { n: task.attempt, of: tries })
      : String(task.attempt)),
    fact(t("fact.by"), task.submitted_by),
    fact(t("fact.node"), task.node ?? "—"),
    fact(t("fact.priority"), String(task.priority)),
    fact(t("fact.timeout"), timeoutText(task)),
    fact(t("fact.mode"), task.pty ? "PTY" : t(task.interactive ? "fact.interactive" : "fact.pipes")),
    fact(t("fact.created"), formatTime(task.created_at)),
    fact(t("fact.started"), formatTime(task.started_at)),
    fact(t("fact.finished"), formatTime(task.finished_at)),
    fact(t("fact.duration"), durationText(task), "task-duration"),
    fact(t("fact.exit"), exitText(task.exit_code)),
    fact(t("fact.output"), formatBytes(task.output_bytes)),
    task.error ? fact(t("fact.error"), task.error) : [],
  ];
  $("#task-facts").replaceChildren(...facts.flat());
  const params = Object.entries(task.params ?? {});
  $("#task-params").replaceChildren(...(params.length ? params.flatMap(([key, value]) => fact(
    key, typeof value === "string" ? value : JSON.stringify(value))) : [el("dd", {
    textContent: t("fact.none") })]));
  const rows = attempts(events).map((a) => el("tr", {},
    el("td", { textContent: String(a.attempt) }),
    el("td", { textContent: clock(a.start), title: formatTime(a.start) }),
    el("td", { textContent: a.end ? clock(a.end) : outcomeText(a.outcome),
               title: formatTime(a.end) }),
    el("td", { textContent: exitText(a.exitCode) }),
    el("td", { textContent: a.error
      ?? (a.end && a.outcome !== "success" ? outcomeText(a.outcome) : "—") })));
  if (!rows.length) {
    const why = t(FINAL.has(task.status) ? "fact.never_ran" : "fact.not_started");
    rows.push(el("tr", {}, el("td", { colSpan: 5, textContent: why })));
  }
  $("#task-attempts tbody").replaceChildren(...rows);
  const base = `/tasks/${task.id}/output`;
  const links = [["raw", base], ["jsonl", `${base}?format=jsonl`]];
  if (!task.pty) links.splice(1, 0, ["stdout", `${base}?stream=stdout`],
                             ["stderr", `${base}?stream=stderr`]);
  $("#task-downloads").replaceChildren(...links.map(([label, href]) => el("a", {
    href: withKey(href), textContent: label, download: "", title: t("fact.download", { label }) })));
}
