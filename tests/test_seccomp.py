"""bwrap's seccomp filter, for real: each call it denies fails with EPERM inside the default
sandbox, the 32-bit ABIs too; "off" and profiles change it; ordinary scripts still work."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import ROOT, make_settings, submit, wait_final

from remoterun.catalogue import Catalogue, MetadataError
from remoterun.config import ConfigError, SandboxConfig, parse
from remoterun.isolation import seccomp

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="syscalls.py has x86_64 numbers"),
]
BWRAP = SandboxConfig(mode="bwrap")
EPERM, ENOSYS = 1, 38
ALLOWED = ("personality:0", "personality:0x8", "personality:0xffffffff", "getpriority")


async def calls(client: TestClient, **params: Any) -> dict[str, int]:
    """Run syscalls.py with these params; the errno of each call (the task must succeed)."""
    task = await submit(client, "syscalls.py", params=params)
    done = await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert done["status"] == "success", (done, out)
    return json.loads(out)  # type: ignore[no-any-return]


async def test_default_filter_refuses_each_call_with_eperm(make_client):
    """Inside the default sandbox every denied call, the refused personalities, clone with a
    namespace flag, and getpid through the x32 and x86 (`int 0x80`) ABIs get EPERM; clone3
    gets ENOSYS (glibc then uses clone); the allowed personalities and other calls go through."""
    client = await make_client(sandbox=BWRAP)
    report = await calls(client)
    assert report["Seccomp"] == 2  # a filter is loaded
    refused = [*seccomp.DENIED, "personality:0x40000", "personality:0x400000",
               *(f"clone:{flag}" for flag in ("NEWNS", "NEWCGROUP", "NEWUTS", "NEWIPC",
                                               "NEWUSER", "NEWPID", "NEWNET")),
               "x32:getpid", "int80:getpid"]
    assert {name: report[name] for name in refused} == dict.fromkeys(refused, EPERM)
    assert report["clone3"] == ENOSYS
    assert {name: report[name] for name in ALLOWED} == dict.fromkeys(ALLOWED, 0)


async def test_seccomp_off_lets_ptrace_through(make_client):
    """A script whose config.toml table says seccomp = "off" runs without a filter:
    PTRACE_TRACEME succeeds, as do unshare(0) and a 32-bit getpid."""
    client = await make_client(sandbox=BWRAP, scripts={
        "syscalls.py": {"sandbox": {"seccomp": "off"}}})
    report = await calls(client, only="unshare,int80:getpid", traceme="1")
    assert report == {"unshare": 0, "int80:getpid": 0, "ptrace:TRACEME": 0, "Seccomp": 0}


async def test_a_profile_adds_and_lifts_denials(make_client, tmp_path):
    """A profile (a path relative to the config file) denies getpriority too, and lets
    personality(ADDR_NO_RANDOMIZE) through; the rest of the default list stays."""
    (tmp_path / "profile.toml").write_text('deny = ["getpriority"]\nallow = ["personality"]\n')
    client = await make_client(sandbox=SandboxConfig(mode="bwrap", seccomp="profile.toml"),
                               config_path=tmp_path / "config.toml")
    report = await calls(client, only="getpriority,personality:0x40000,ptrace,mount")
    assert report == {"getpriority": EPERM, "personality:0x40000": 0, "ptrace": EPERM,
                      "mount": EPERM, "Seccomp": 2}


async def test_ordinary_scripts_work_under_the_filter(make_client):
    """bash pipelines and subshells, python threads and subprocesses (glibc's clone3 falls back
    to clone) and a PTY all work in the filtered sandbox."""
    client = await make_client(sandbox=BWRAP)
    for pty in (False, True):
        task = await submit(client, "ordinary.sh", pty=pty)
        done = await wait_final(client, task["id"])
        out = await (await client.get(f"/tasks/{task['id']}/output")).text()
        assert done["status"] == "success", (done, out)
        assert out.replace("\r\n", "\n").split() == ["B", "thread", "child", "3", "tty" if pty
                                                     else "notty"], out


def test_a_bad_profile_stops_the_server(tmp_path):
    """A profile naming an unknown call or key is refused at start, naming the setting."""
    for text, said in (('deny = ["no_such_call"]', "unknown system call 'no_such_call'"),
                       ('deny = "ptrace"', "expected a list"), ("kill = []", "unknown key")):
        (tmp_path / "bad.toml").write_text(text)
        filters = seccomp.Filters()
        with pytest.raises(ConfigError, match=rf"sandbox\.seccomp: .*{said}"):
            filters.build([("sandbox.seccomp", str(tmp_path / "bad.toml"))])
    with pytest.raises(ConfigError, match=r"sandbox\.seccomp: "):
        parse({"sandbox": {"seccomp": 1}}, tmp_path)
    assert parse({"sandbox": {"seccomp": "off"}}, tmp_path).sandbox.seccomp == "off"


def test_serve_refuses_a_bad_profile(tmp_path):
    """`remoterun serve` with a profile it cannot use exits 2 saying why, naming the key."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "bad.toml").write_text('deny = ["no_such_call"]\n')
    (tmp_path / "config.toml").write_text(
        '[server]\nport = 0\n[paths]\nscripts = "scripts"\narchive = "archive"\n'
        'db = "rr.db"\n[sandbox]\nmode = "bwrap"\nseccomp = "bad.toml"\n')
    done = subprocess.run([sys.executable, "-m", "remoterun", "serve", "--config",
                           str(tmp_path / "config.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "config error: sandbox.seccomp: " in done.stderr
    assert "unknown system call 'no_such_call'" in done.stderr


@pytest.mark.parametrize(("config", "sidecar", "allowed"), [
    ("default", "off", False), ("default", "p.toml", False), ("p.toml", "default", False),
    ("p.toml", "off", False), ("off", "default", True), ("p.toml", "p.toml", True),
])
def test_a_sidecar_may_not_relax_the_filter(tmp_path, config, sidecar, allowed):
    """Only config.toml turns the filter off or picks a profile; a sidecar, signed or not, may
    only repeat [sandbox] seccomp, or ask for the default filter where it is off."""
    settings = make_settings(tmp_path, sandbox=SandboxConfig(mode="bwrap", seccomp=config))
    (settings.scripts_dir / "hello.sh.toml").write_text(f'sandbox = {{seccomp = "{sidecar}"}}\n')
    catalogue = Catalogue(settings.scripts_dir, {}, settings.sandbox, settings.limits)
    if allowed:
        assert catalogue.resolve("hello.sh").sandbox == {"seccomp": sidecar}
    else:
        with pytest.raises(MetadataError, match=r"sandbox\.seccomp: .*config\.toml"):
            catalogue.resolve("hello.sh")
    trusted = Catalogue(settings.scripts_dir, {"hello.sh": {"sandbox": {"seccomp": sidecar}}},
                        settings.sandbox, settings.limits)
    assert trusted.resolve("hello.sh").sandbox == {"seccomp": sidecar}


def test_resolve_takes_a_profile_from_the_config_folder():
    """A relative profile path is the config folder's; default, off and absolute paths stay."""
    base = Path("/etc/remoterun")
    assert seccomp.resolve("p.toml", base) == "/etc/remoterun/p.toml"
    assert [seccomp.resolve(s, base) for s in ("default", "off", "/x/p.toml")] == [
        "default", "off", "/x/p.toml"]
