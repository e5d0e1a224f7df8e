// Helpers shared by the page's modules: HTTP, DOM building, formatting.

import { lang, t } from "./i18n.js";

export const FINAL = new Set(["success", "failed", "timeout", "cancelled"]);

export const $ = (selector) => document.querySelector(selector);

export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// The session's key: the login's answer, kept in this origin's storage (another port of the
// host is another origin and cannot read it) and sent beside the HttpOnly cookie, which alone
// never authenticates (the server's cookie is readable by every port of the host).
const SESSION_KEY = "remoterun.sessionKey";

export const sessionKey = {
  get: () => localStorage.getItem(SESSION_KEY),
  set: (key) => (key ? localStorage.setItem(SESSION_KEY, key) : localStorage.removeItem(SESSION_KEY)),
};

// Headers for a call of the API: JSON, and the session key when there is one.
export function apiHeaders(extra = {}) {
  const key = sessionKey.get();
  return { Accept: "application/json", ...(key ? { "X-RemoteRun-Session-Key": key } : {}), ...extra };
}

// A URL with the session key in its query, for what cannot send a header: a WebSocket, an
// EventSource, a download link. Never for a link meant to be shared (`/?task=`).
export function withKey(path) {
  const key = sessionKey.get();
  if (!key) return path;
  return `${path}${path.includes("?") ? "&" : "?"}session_key=${encodeURIComponent(key)}`;
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: apiHeaders() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

// Seconds the task ran (first start to end, or to now while it runs); null before it started.
export function seconds(task) {
  if (!task.started_at) return null;
  const end = task.finished_at ? new Date(task.finished_at) : new Date();
  return Math.max(0, (end - new Date(task.started_at)) / 1000);
}

export function formatSeconds(s) {
  if (s < 60) return t("dur.s", { s: s.toFixed(s < 10 ? 2 : 1) });
  if (s < 3600) return t("dur.ms", { m: Math.floor(s / 60), s: Math.round(s % 60) });
  return t("dur.hm", { h: Math.floor(s / 3600), m: Math.round((s % 3600) / 60) });
}

export function formatWhen(date) {
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString(lang) : date.toLocaleDateString(lang);
}

export function formatTime(iso) {
  return iso ? new Date(iso).toLocaleString(lang) : "—";
}

export function formatBytes(n) {
  if (n == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
