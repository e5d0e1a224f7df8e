// The stats view: per-script success rate and p95 duration from GET /stats, drawn as SVG.
// A dialog of its own, so the terminal page's app.js knows nothing of it: the header's
// "Stats" button or `/?view=stats` opens it.

import { apiHeaders } from "./util.js";

const SVG = "http://www.w3.org/2000/svg";
const WINDOWS = [["1h", "last hour"], ["24h", "last 24 hours"], ["7d", "last 7 days"]];
const ROW = 28;        // px per script in the chart
const NAME_W = 150;    // the script names' column
const BAR_W = 220;     // each bar's full width
const GAP = 24;

const dialog = document.getElementById("stats");
const opener = document.getElementById("stats-open");

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text) node.textContent = text;
  return node;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  if (value < 7200) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

function percent(rate) {
  return rate === null ? "–" : `${(rate * 100).toFixed(rate === 1 ? 0 : 1)}%`;
}

// Two bars per script: success rate (green, the failed share red) and p95 duration, scaled
// to the slowest script's p95 (with its p50 as a tick).
function chart(scripts) {
  const names = Object.keys(scripts);
  const width = NAME_W + 2 * BAR_W + 2 * GAP + 90;
  const height = 24 + names.length * ROW;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                            "aria-label": "Success rate and p95 duration by script" });
  const slowest = Math.max(0, ...names.map((n) => scripts[n].duration_p95 || 0)) || 1;
  const rateX = NAME_W;
  const timeX = NAME_W + BAR_W + GAP + 50;
  root.append(svg("text", { x: rateX, y: 14, class: "axis" }, "success rate"),
              svg("text", { x: timeX, y: 14, class: "axis" }, "p95 duration (tick: p50)"));
  names.forEach((name, i) => {
    const s = scripts[name];
    const y = 24 + i * ROW;
    const label = svg("g");
    label.append(svg("title", {}, `${name}: ${s.count} runs`),
                 svg("text", { x: 0, y: y + 15, class: "name" }, name));
    root.append(label);
    root.append(svg("rect", { x: rateX, y: y + 3, width: BAR_W, height: 16, class: "track" }));
    if (s.success_rate !== null) {
      const ok = BAR_W * s.success_rate;
      if (ok > 0) root.append(svg("rect", { x: rateX, y: y + 3, width: ok, height: 16, class: "ok" }));
      if (ok < BAR_W) {
        root.append(svg("rect", { x: rateX + ok, y: y + 3, width: BAR_W - ok, height: 16,
                                  class: "bad" }));
      }
    }
    root.append(svg("text", { x: rateX + BAR_W + 6, y: y + 15, class: "value" },
                    percent(s.success_rate)));
    root.append(svg("rect", { x: timeX, y: y + 3, width: BAR_W, height: 16, class: "track" }));
    if (s.duration_p95 !== null) {
      root.append(svg("rect", { x: timeX, y: y + 3, width: Math.max(2, BAR_W * s.duration_p95 / slowest),
                                height: 16, class: "time" }));
      const tick = timeX + BAR_W * (s.duration_p50 || 0) / slowest;
      root.append(svg("line", { x1: tick, x2: tick, y1: y + 1, y2: y + 21, class: "tick" }));
    }
    root.append(svg("text", { x: timeX + BAR_W + 6, y: y + 15, class: "value" },
                    seconds(s.duration_p95)));
  });
  return root;
}

function table(scripts) {
  const t = el("table", { class: "stats-table" });
  const head = el("tr");
  for (const h of ["script", "runs", "success", "failed", "timeout", "cancelled", "success rate",
                   "p50", "p95", "queue wait p95"]) head.append(el("th", {}, h));
  t.appendChild(el("thead")).append(head);
  const body = t.appendChild(el("tbody"));
  for (const [name, s] of Object.entries(scripts)) {
    const row = el("tr");
    const by = s.by_status;
    for (const cell of [name, s.count, by.success || 0, by.failed || 0, by.timeout || 0,
                        by.cancelled || 0, percent(s.success_rate), seconds(s.duration_p50),
                        seconds(s.duration_p95), seconds(s.queue_wait_p95)]) {
      row.append(el("td", {}, String(cell)));
    }
    body.append(row);
  }
  return t;
}

async function load(since) {
  const out = dialog.querySelector("#stats-body");
  out.replaceChildren(el("p", { class: "help" }, "loading…"));
  const response = await fetch(`/stats?since=${encodeURIComponent(since)}`, { headers: apiHeaders() });
  const body = await response.json();
  if (!response.ok) {
    out.replaceChildren(el("p", { class: "error", role: "alert" }, body.message || response.statusText));
    return;
  }
  const scripts = body.scripts;
  if (Object.keys(scripts).length === 0) {
    out.replaceChildren(el("p", { class: "help" }, "No tasks in this window."));
    return;
  }
  out.replaceChildren(chart(scripts), table(scripts));
  dialog.dataset.loaded = since;
}

function build() {
  const bar = el("div", { class: "bar" });
  bar.append(el("h2", {}, "Stats"));
  const pick = el("select", { id: "stats-window", "aria-label": "Window" });
  for (const [value, label] of WINDOWS) pick.append(el("option", { value }, label));
  pick.value = "24h";
  pick.addEventListener("change", () => load(pick.value));
  const close = el("button", { type: "button", id: "stats-close" }, "Close");
  close.addEventListener("click", () => dialog.close());
  bar.append(el("span", { class: "spacer" }), pick, close);
  dialog.append(bar, el("div", { id: "stats-body" }));
  return pick;
}

if (dialog && opener) {
  const pick = build();
  const open = () => {
    if (!dialog.open) dialog.showModal();
    load(pick.value);
  };
  opener.addEventListener("click", open);
  if (new URLSearchParams(location.search).get("view") === "stats") open();
}
