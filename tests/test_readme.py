"""Every `sh` example of README.md runs as written against a live server (only its port and the
`<id>` of the task the block submitted are filled in), and none fails."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT, ServerProcess

README = ROOT / "README.md"


def sh_blocks() -> list[list[str]]:
    """The README's ```sh blocks as logical lines (continuations joined, comment lines out),
    except the one of `make` commands (`make test` is this suite)."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        lines = [line for line in body.replace("\\\n", " ").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        if all(line.startswith("make ") for line in lines):
            continue
        blocks.append(lines)
    return blocks


@pytest.fixture
def live(tmp_path):
    """A server on the repository's example scripts, its config.toml in the working folder."""
    server = ServerProcess(tmp_path)
    shutil.rmtree(tmp_path / "scripts")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    server.start()
    yield server
    server.stop()


def as_run_here(line: str, server: ServerProcess) -> str:
    """The line for this server: its port instead of 8080."""
    return line.replace("localhost:8080", f"localhost:{server.port}")


def run_curl_block(lines: list[str], server: ServerProcess) -> list[str]:
    """Each line in turn; `<id>` is the task the last POST /tasks of the block made."""
    outputs, task_id = [], None
    for line in lines:
        if "<id>" in line:
            assert task_id is not None, f"no task submitted before {line!r}"
            line = line.replace("<id>", task_id)
        ran = subprocess.run(["bash", "-c", as_run_here(line, server)], capture_output=True,
                             text=True, timeout=60, cwd=server.tmp_path)
        assert ran.returncode == 0, (line, ran.stderr)
        assert ran.stdout and not ran.stdout.startswith('{"error"'), (line, ran.stdout[:500])
        if "-X POST" in line and re.search(r"/tasks'? ", line + " "):
            task_id = json.loads(ran.stdout)["id"]
        outputs.append(ran.stdout)
    return outputs


def run_shell_block(lines: list[str], server: ServerProcess) -> str:
    """The block as one bash script (its variables carry over); any failing line fails it."""
    script = []
    for line in lines:
        script.append(as_run_here(line, server))
        script.append(f"rc=$?; [ $rc -eq 0 ] || {{ echo \"README line failed ($rc):\" "
                      f"{shlex.quote(line)} >&2; exit 1; }}")
    env = {**os.environ, "REMOTERUN_URL": server.url}
    ran = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True,
                         timeout=120, cwd=server.tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran.stdout


def test_readme_has_examples():
    """The README has curl blocks and a CLI block to run."""
    blocks = sh_blocks()
    assert any(b[0].startswith("curl") for b in blocks)
    assert any(line.startswith("remoterun ") for b in blocks for line in b)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_readme_example_runs(live):
    """Each sh block of the README runs against a live server without an error."""
    seen = ""
    for block in sh_blocks():
        if any("remoterun" in line.split("#")[0] for line in block):
            seen += run_shell_block(block, live)
        else:
            seen += "".join(run_curl_block(block, live))
    assert "stdout line 3 of 3" in seen  # count.sh's output came back
    assert "exit code: 3" in seen and "Hello, Ada!" in seen and "Hello, Grace!" in seen
