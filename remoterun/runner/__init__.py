"""One run of a child: its spec and result, its streams, its signals, and why it could not start.

`run` (the Run: started, read, signalled, waited for, drained), `spec` (RunSpec, RunResult),
`streams` (pipes and the PTY: UTF-8 cuts, coalescing, buffered input), `signals` (the process
group's signals, held for a sandbox), `failures` (SpawnError, the #! check, the words for a
failed spawn). The names below are the runner's public face for the engine.
"""

from remoterun.runner.failures import (
    NOT_STARTED,
    SpawnError,
    is_transient,
    spawn_message,
    start_problem,
)
from remoterun.runner.run import Run
from remoterun.runner.spec import OnOutput, RunResult, RunSpec

__all__ = ["NOT_STARTED", "OnOutput", "Run", "RunResult", "RunSpec", "SpawnError", "is_transient",
           "spawn_message", "start_problem"]
