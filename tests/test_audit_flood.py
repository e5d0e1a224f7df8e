"""Issue 26, attack 7: a flood of refused requests without credentials writes a bounded number
of `denied` rows (one per address and reason a second), and summary rows count the rest."""

from __future__ import annotations

import asyncio
import time

from conftest import TOKENS, wait_for

ADMIN = {"Authorization": "Bearer admin-token"}
FOREIGN = {"Origin": "http://127.0.0.1:9"}  # another port of the host: another origin
FLOOD = 400


def left_out(row: dict) -> int:
    """How many refusals a summary row stands for (0 for a row of one refusal)."""
    words = (row["detail"] or "").split()
    return int(words[1]) if words[:1] == ["summary:"] else 0


async def test_denials_are_rate_limited_and_summarized(make_client):
    """400 foreign-Origin requests and 400 wrong tokens: a handful of rows per second, and the
    summaries account for every refusal left out."""
    client = await make_client(tokens=TOKENS, auth_fail_limit=100_000)
    started = time.monotonic()
    for headers, path in ((FOREIGN, "/tasks"), ({"Authorization": "Bearer wrong-token"},
                                                "/scripts")):
        answers = await asyncio.gather(*(client.get(path, headers=headers)
                                         for _ in range(FLOOD)))
        assert {a.status for a in answers} <= {401, 403}
    seconds = time.monotonic() - started

    async def accounted() -> list[dict] | None:
        response = await client.get("/audit?action=denied&limit=500", headers=ADMIN)
        rows = (await response.json())["events"]
        by_reason = {reason: sum(left_out(r) or 1 for r in rows if r["result"] == reason)
                     for reason in ("bad_origin", "unauthorized")}
        return rows if by_reason == {"bad_origin": FLOOD, "unauthorized": FLOOD} else None

    rows = await wait_for(accounted, timeout=10, what="summaries of every refusal")
    per_reason = 2 * (int(seconds) + 3)  # one row a second and one summary, with slack
    for reason in ("bad_origin", "unauthorized"):
        assert len([r for r in rows if r["result"] == reason]) <= per_reason, rows
    summary = next(r for r in rows if left_out(r))
    assert summary["address"] == "127.0.0.1" and summary["action"] == "denied"
