// The terminal's window onto a log of any size: frames by seq from /output?format=jsonl,
// fetched on demand (earlier ones when the user scrolls to the top, later ones at the bottom,
// those around a search match), so the tab holds a bounded part of the log, never all of it.

import { $, apiHeaders, withKey } from "./util.js";

export const WINDOW_LINES = 8000; // lines the window keeps (xterm's scrollback is larger)
const FETCH_BYTES = 256 * 1024; // about this much output per fetch

// Frames with after < seq <= until, in order. The download streams to the log's end; we stop
// reading (and the server stops sending) once `until` is reached.
export async function framesBetween(taskId, after, until) {
  const path = withKey(`/tasks/${encodeURIComponent(taskId)}/output?format=jsonl&since=${after}`);
  const response = await fetch(path, { headers: apiHeaders() });
  if (!response.ok) throw new Error(`the output could not be read (HTTP ${response.status})`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const frames = [];
  let rest = "";
  let finished = false;
  while (!finished) {
    const { value, done } = await reader.read();
    if (done) break;
    const lines = (rest + value).split("\n");
    rest = lines.pop();
    for (const line of lines) {
      const frame = JSON.parse(line);
      finished = frame.seq >= until;
      if (frame.seq <= until) frames.push(withLines(frame));
      if (finished) break;
    }
  }
  reader.cancel().catch(() => {});
  return frames;
}

// A frame with its newline count, which the window's bound is kept in.
export function withLines(frame) {
  let lines = 0;
  for (let i = frame.data.indexOf("\n"); i >= 0; i = frame.data.indexOf("\n", i + 1)) lines++;
  return { seq: frame.seq, stream: frame.stream, data: frame.data, lines };
}

// How many frames make about FETCH_BYTES, judging by the frames held.
export function framesPerFetch(frames) {
  const bytes = frames.reduce((sum, f) => sum + f.data.length, 0);
  const average = frames.length ? Math.max(bytes / frames.length, 1) : 4096;
  return Math.max(1, Math.min(5000, Math.round(FETCH_BYTES / average)));
}

// Drop frames from one end until the window holds at most WINDOW_LINES lines; how many went.
export function trim(frames, fromStart) {
  let lines = frames.reduce((sum, f) => sum + f.lines, 0);
  let dropped = 0;
  while (frames.length > 1 && lines > WINDOW_LINES) {
    lines -= (fromStart ? frames.shift() : frames.pop()).lines;
    dropped++;
  }
  return dropped;
}

// The terminal's reading of older output and search matches; `ctx` is app.js's terminal, its
// open task's `view`, the socket's connect and disconnect, notice and frameText.
export function windowed({ term, view, connect, disconnect, notice, frameText }) {
  const written = (data) => new Promise((resolve) => term.write(data, resolve));

  // Show `frames` afresh; the terminal row where frame `anchorSeq` starts.
  async function render(frames, anchorSeq) {
    view.frames = frames;
    term.reset();
    const before = frames.filter((f) => f.seq < anchorSeq).map(frameText).join("");
    await written(before);
    const row = term.buffer ? term.buffer.active.baseY + term.buffer.active.cursorY : 0;
    await written(frames.filter((f) => f.seq >= anchorSeq).map(frameText).join(""));
    return row;
  }

  // Stop following the live end: the user reads older output (the socket would only add to it).
  function detach() {
    view.following = false;
    disconnect();
    $("#to-end").hidden = false;
  }

  async function loadEarlier() {
    const first = view.frames[0]?.seq ?? 1;
    if (first <= 1) return;
    const after = Math.max(0, first - 1 - framesPerFetch(view.frames));
    const earlier = await framesBetween(view.id, after, first - 1);
    const frames = earlier.concat(view.frames);
    if (trim(frames, false)) detach();
    const row = await render(frames, first);
    term.scrollToLine(Math.max(0, row - 1));
  }

  async function loadLater() {
    const last = view.frames[view.frames.length - 1]?.seq ?? 0;
    const count = framesPerFetch(view.frames);
    const later = await framesBetween(view.id, last, last + count);
    if (!later.length) return toEnd(); // the end of what exists: follow it live
    const frames = view.frames.concat(later);
    trim(frames, true);
    const row = await render(frames, later[0].seq);
    term.scrollToLine(Math.max(0, row - term.rows + 1));
  }

  // Scrolled to the top of what is held, or (reading older output) to its bottom: load more.
  // Output arriving scrolls too, but never to the top of a buffer that has scrollback; a wheel
  // turned up (`wheel`) asks even when everything held fits on the screen.
  async function onScrolled(wheel = false) {
    if (view.loading || !view.id || !term.buffer) return;
    const buffer = term.buffer.active;
    const atTop = buffer.viewportY === 0 && (buffer.baseY > 0 || wheel === true)
      && (view.frames[0]?.seq ?? 1) > 1;
    const atBottom = !view.following && buffer.viewportY >= buffer.baseY;
    if (!atTop && !atBottom) return;
    view.loading = true;
    try {
      await (atTop ? loadEarlier() : loadLater());
    } catch (error) {
      notice(error.message);
    } finally {
      view.loading = false;
    }
  }

  // Back to the live end: the last lines again, then live.
  function toEnd() {
    disconnect();
    Object.assign(view, { following: true, lastSeq: 0, frames: [], retries: 0 });
    $("#to-end").hidden = true;
    term.reset();
    connect();
  }

  // A search match (find.js): the frames around it, scrolled to and selected.
  async function showMatch(match, query) {
    const before = Math.max(1, Math.floor(framesPerFetch(view.frames) / 2));
    const frames = await framesBetween(view.id, Math.max(0, match.seq - 1 - before),
                                       match.seq + before);
    if (!frames.length) return;
    detach();
    view.loading = true;
    try {
      const start = await render(frames, match.seq);
      const buffer = term.buffer?.active;
      if (!buffer) return;
      const needle = match.text.slice(0, 200) || query;
      for (let row = Math.max(0, start); row < buffer.length; row++) {
        const text = buffer.getLine(row).translateToString(true);
        if (text.includes(needle.slice(0, term.cols)) || text.includes(query)) {
          term.scrollToLine(Math.max(0, row - Math.floor(term.rows / 3)));
          term.select(0, row, Math.min(term.cols, text.length));
          return;
        }
      }
    } finally {
      view.loading = false;
    }
  }

  // The rows the terminal shows now (tests read it).
  function visibleText() {
    if (!term.buffer) return term.pre.textContent;
    const buffer = term.buffer.active;
    const rows = [];
    for (let i = buffer.viewportY; i < buffer.viewportY + term.rows && i < buffer.length; i++) {
      rows.push(buffer.getLine(i).translateToString(true));
    }
    return rows.join("\n");
  }

  return { onScrolled, showMatch, toEnd, visibleText };
}
