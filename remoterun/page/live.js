// Follows GET /events: every task transition the caller may see, live, resumed after a drop
// or a server restart from the last event id seen (EventSource sends Last-Event-ID itself;
// a stream we reopen says ?since=).

import { t } from "./i18n.js";
import { $, withKey } from "./util.js";

const RETRY_MS = 3000;

export function follow(onTask) {
  let lastId = null;
  let firstReady;
  const ready = new Promise((resolve) => { firstReady = resolve; });
  const status = (text) => { $("#live").textContent = text; };

  function open() {
    const source = new EventSource(withKey(lastId == null ? "/events" : `/events?since=${lastId}`));
    source.addEventListener("task", (event) => {
      lastId = event.lastEventId;
      onTask(JSON.parse(event.data));
    });
    source.addEventListener("ready", (event) => {
      lastId = event.lastEventId;
      status(t("live.live"));
      firstReady();
    });
    source.onerror = () => {
      status(t("live.reconnecting"));
      if (source.readyState === EventSource.CLOSED) { // refused (a 4xx): try again later
        setTimeout(open, RETRY_MS);
        firstReady();
      }
    };
  }

  open();
  return ready;
}
