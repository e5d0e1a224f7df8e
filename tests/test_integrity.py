"""Script integrity: sha256 pins and Ed25519 signatures, refused with 409 and audited, at submit
and at each attempt; the bytes checked are the bytes run."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import TOKENS, make_settings, submit, wait_final
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from remoterun.api import SETTINGS
from remoterun.catalogue import Catalogue, MetadataError
from remoterun.config import ConfigError, ResourceLimits, SandboxConfig, parse
from remoterun.integrity import SIG_SUFFIX

ADMIN = {"Authorization": "Bearer admin-token"}
OPS = {"Authorization": "Bearer operator-token"}


def raw_public(key: Ed25519PrivateKey) -> bytes:
    """The key's 32 raw public bytes, as Settings keeps them."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def sign_file(key: Ed25519PrivateKey, script: Path) -> None:
    """Write `<script>.sig` (base64 text) for the script's bytes as they are now."""
    sig = base64.b64encode(key.sign(script.read_bytes())).decode()
    script.with_name(script.name + SIG_SUFFIX).write_text(sig + "\n")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """A fresh signing key."""
    return Ed25519PrivateKey.generate()


async def audit_rows(client) -> list[dict]:
    """Every audit event, newest first (as the admin)."""
    response = await client.get("/audit?action=submit", headers=ADMIN)
    assert response.status == 200, await response.text()
    return (await response.json())["events"]  # type: ignore[no-any-return]


async def refused(client, script: str, headers=OPS) -> dict:
    """POST /tasks expecting 409 integrity_failed; the error body."""
    response = await client.post("/tasks", json={"script": script}, headers=headers)
    body = await response.json()
    assert response.status == 409, body
    assert body["error"] == "integrity_failed" and body["message"]
    return body  # type: ignore[no-any-return]


async def test_sha256_pin(make_client, tmp_path):
    """A script whose bytes match its pinned sha256 runs; a pin that does not match is
    refused 409 integrity_failed and the refusal is audited."""
    scripts = make_settings(tmp_path).scripts_dir
    digest = hashlib.sha256((scripts / "hello.sh").read_bytes()).hexdigest()
    client = await make_client(tokens=TOKENS, scripts={
        "hello.sh": {"sha256": digest.upper()}, "exit.sh": {"sha256": "0" * 64}})
    task = await submit(client, "hello.sh", headers=OPS)
    assert (await wait_final(client, task["id"], headers=OPS))["status"] == "success"
    body = await refused(client, "exit.sh")
    assert "pinned sha256" in body["message"]
    rows = await audit_rows(client)
    assert [r["result"] for r in rows] == ["integrity_failed", "ok"]
    assert rows[0]["script"] == "exit.sh" and rows[0]["task_id"] is None
    assert "pinned sha256" in rows[0]["detail"] and rows[0]["actor"] == "ops"
    listed = await (await client.get("/tasks", headers=OPS)).json()
    assert [t["script"] for t in listed["tasks"]] == ["hello.sh"]  # nothing was queued


async def test_signatures_required(make_client, tmp_path, key):
    """With public_keys, an unsigned script, a tampered one and one signed by another key are
    refused (REST and WebSocket) and audited; a signed one runs."""
    scripts = make_settings(tmp_path).scripts_dir
    hello = scripts / "hello.sh"
    sign_file(key, hello)
    client = await make_client(tokens=TOKENS, integrity_public_keys=(
        raw_public(Ed25519PrivateKey.generate()), raw_public(key)))
    task = await submit(client, "hello.sh", headers=OPS)
    assert (await wait_final(client, task["id"], headers=OPS))["status"] == "success"
    assert "not signed" in (await refused(client, "exit.sh"))["message"]
    sign_file(Ed25519PrivateKey.generate(), scripts / "exit.sh")
    assert "does not verify" in (await refused(client, "exit.sh"))["message"]
    hello.write_text(hello.read_text() + "echo tampered\n")
    assert "does not verify" in (await refused(client, "hello.sh"))["message"]
    ws = await client.ws_connect("/ws", headers=OPS)
    await ws.send_json({"type": "submit", "script": "hello.sh"})
    error = await ws.receive_json(timeout=10)
    assert error["type"] == "error" and error["error"] == "integrity_failed"
    await ws.close()
    results = [(r["script"], r["result"]) for r in await audit_rows(client)]
    assert results == [("hello.sh", "integrity_failed")] * 2 + [
        ("exit.sh", "integrity_failed")] * 2 + [("hello.sh", "ok")]
    sig = await client.post("/tasks", json={"script": "hello.sh.sig"}, headers=OPS)
    assert sig.status == 404  # a signature file is never a script


async def test_swap_between_submit_and_start_is_refused(make_client, tmp_path, key):
    """A script signed at submit but rewritten while its task waits fails at its attempt's
    check: its new bytes never run, and it is not retried."""
    scripts = make_settings(tmp_path).scripts_dir
    for name in ("hello.sh", "sleep.sh"):
        sign_file(key, scripts / name)
    client = await make_client(workers=1, integrity_public_keys=(raw_public(key),))
    blocker = await submit(client, "sleep.sh", params={"seconds": 30})
    task = await submit(client, "hello.sh", max_retries=2)
    marker = tmp_path / "swapped-ran"
    (scripts / "hello.sh").write_text(f"#!/bin/sh\ntouch {marker}\necho swapped\n")
    await client.post(f"/tasks/{blocker['id']}/cancel")
    done = await wait_final(client, task["id"])
    assert done["status"] == "failed" and done["attempt"] == 1, done
    assert "does not verify" in done["error"]
    assert not marker.exists()
    assert (await (await client.get(f"/tasks/{task['id']}/output")).read()) == b""


async def test_the_checked_copy_is_what_runs(make_client, tmp_path, key):
    """A signed task runs from a private 0500 copy (its $0), so rewriting the script in place
    while bash reads it changes nothing of the run; the copy is gone after the end."""
    scripts = make_settings(tmp_path).scripts_dir
    script = scripts / "two_parts.sh"
    sign_file(key, script)
    client = await make_client(integrity_public_keys=(raw_public(key),))
    task = await submit(client, "two_parts.sh")
    ws = await client.ws_connect(f"/tasks/{task['id']}/ws")
    text = ""
    async with asyncio.timeout(15):
        while "part one" not in text:
            msg = json.loads((await ws.receive()).data)
            text += msg.get("data", "") if msg["type"] == "output" else ""
    copy = Path(text.split("from ")[1].split()[0])
    db = client.server.app[SETTINGS].db_path
    run_dir = db.with_name(db.name + "-run")
    assert copy.is_relative_to(run_dir) and copy.name == "two_parts.sh"
    modes = await asyncio.to_thread(lambda: (copy.stat().st_mode, copy.parent.stat().st_mode))
    assert [stat.S_IMODE(m) for m in modes] == [0o500, 0o700]

    def rewrite() -> None:  # same inode, same length: what bash would read next
        original = script.read_bytes()
        with script.open("r+b") as fh:
            fh.write(original.replace(b'echo "part two"', b'echo "PWNED!!!"'))

    await asyncio.to_thread(rewrite)
    await ws.close()
    done = await wait_final(client, task["id"])
    assert done["status"] == "success", done
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert out.endswith("part two\n") and "PWNED" not in out
    assert not copy.parent.exists()


async def test_no_rule_runs_the_script_in_place(client):
    """Without a pin or public keys nothing is copied: $0 is the script in the scripts folder."""
    task = await submit(client, "two_parts.sh")
    await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    scripts = client.server.app[SETTINGS].scripts_dir.resolve()
    assert f"part one from {scripts}/two_parts.sh" in out


def test_config_errors_name_the_key(tmp_path):
    """A malformed public key or pin names its key; PEM, DER, hex and base64 keys load."""
    key = Ed25519PrivateKey.generate()
    raw = raw_public(key)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    for form in (raw.hex(), base64.b64encode(raw).decode(), pem.decode()):
        settings = parse({"integrity": {"public_keys": [form]}}, tmp_path)
        assert settings.integrity_public_keys == (raw,)
    with pytest.raises(ConfigError, match=r"integrity.public_keys\[1\]"):
        parse({"integrity": {"public_keys": [raw.hex(), "not-a-key"]}}, tmp_path)
    with pytest.raises(ConfigError, match=r"redaction.patterns\[0\]"):
        parse({"redaction": {"patterns": ["x|"]}}, tmp_path)
    from remoterun.catalogue import MetadataError, parse_metadata
    with pytest.raises(MetadataError, match=r"x.sha256: expected 64 hex"):
        parse_metadata("x", {"sha256": "abc"})


async def test_sign_cli_and_openssl(make_client, tmp_path):
    """`remoterun sign --new-key` makes a key and signs; a signature made with openssl (raw
    bytes) and its PEM public key are accepted too."""
    scripts = make_settings(tmp_path).scripts_dir
    pem = tmp_path / "signing.pem"
    made = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "remoterun", "sign", "--new-key", str(pem),
        str(scripts / "hello.sh")], capture_output=True, text=True, check=True)
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    public = made.stdout.split('public_keys = ["')[1].split('"')[0]
    openssl_key = tmp_path / "openssl.pem"
    for args in (["genpkey", "-algorithm", "ed25519", "-out", str(openssl_key)],
                 ["pkeyutl", "-sign", "-rawin", "-inkey", str(openssl_key), "-in",
                  str(scripts / "exit.sh"), "-out", str(scripts / "exit.sh.sig")]):
        await asyncio.to_thread(subprocess.run, ["openssl", *args], check=True)
    openssl_public = (await asyncio.to_thread(subprocess.run, [
        "openssl", "pkey", "-in", str(openssl_key), "-pubout"], capture_output=True,
        text=True, check=True)).stdout
    settings = parse({"integrity": {"public_keys": [public, openssl_public]}}, tmp_path)
    client = await make_client(integrity_public_keys=settings.integrity_public_keys)
    for script, params in (("hello.sh", {}), ("exit.sh", {"code": 0})):
        task = await submit(client, script, params=params)
        assert (await wait_final(client, task["id"]))["status"] == "success", script
    assert (await client.post("/tasks", json={"script": "lines.py"})).status == 409


async def test_unsigned_sidecar_cannot_unsandbox_a_signed_script(make_client, tmp_path, key):
    """Issue 26, attack 1: `signed.sh` is validly signed; a writer of scripts/ adds
    `signed.sh.toml` with `sandbox = {mode = "none"}` and `env = {BASH_ENV = notes.txt}`. The
    task is refused and notes.txt never runs (before: accepted, notes.txt ran unsandboxed)."""
    scripts = make_settings(tmp_path).scripts_dir
    signed = scripts / "signed.sh"
    signed.write_text("#!/bin/bash\necho signed\n")
    signed.chmod(0o755)
    sign_file(key, signed)
    marker = tmp_path / "notes-ran"
    notes = scripts / "notes.txt"
    notes.write_text(f"touch {marker}\necho PWNED\n")
    (scripts / "signed.sh.toml").write_text(
        f'sandbox = {{mode = "none"}}\nenv = {{BASH_ENV = "{notes}"}}\n')
    client = await make_client(integrity_public_keys=(raw_public(key),))
    response = await client.post("/tasks", json={"script": "signed.sh"})
    body = await response.json()
    if response.status == 201:  # the old behaviour: let it run, to show what it did
        await wait_final(client, body["id"])
    assert not marker.exists(), "notes.txt ran"
    assert response.status != 201, body


async def test_signature_covers_the_sidecar(make_client, tmp_path, key):
    """With public_keys, a sidecar added beside a signed script, changed, or removed after
    `remoterun sign` signed the pair, makes its check fail (409, at submit); the pair as
    signed runs with its metadata."""
    scripts = make_settings(tmp_path).scripts_dir
    script, sidecar = scripts / "greeting.sh", scripts / "greeting.sh.toml"
    script.write_text('#!/bin/sh\necho "greeting=$GREETING"\n')
    script.chmod(0o755)
    sign_file(key, script)  # the script alone, as before sidecars were covered
    sidecar.write_text('env = {GREETING = "tampered"}\n')
    client = await make_client(integrity_public_keys=(raw_public(key),))
    assert "sidecar" in (await refused(client, "greeting.sh"))["message"]
    pem = tmp_path / "signing.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    sidecar.write_text('env = {GREETING = "hello"}\n')
    signed = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "remoterun", "sign", "--key", str(pem), str(script)],
        capture_output=True, text=True)
    assert signed.returncode == 0 and "greeting.sh.toml" in signed.stdout, signed
    await asyncio.sleep(1.1)  # the catalogue's resolution cache (RESOLVE_CACHE_S)
    task = await submit(client, "greeting.sh")
    assert (await wait_final(client, task["id"]))["status"] == "success"
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert out == "greeting=hello\n"
    sidecar.write_text('env = {GREETING = "tampered"}\n')
    await asyncio.sleep(1.1)
    assert "does not verify" in (await refused(client, "greeting.sh"))["message"]
    sidecar.unlink()
    await asyncio.sleep(1.1)
    assert "does not verify" in (await refused(client, "greeting.sh"))["message"]


@pytest.mark.parametrize(("table", "named"), [
    ('env = {BASH_ENV = "/x"}', "env.BASH_ENV"),
    ('env = {LD_PRELOAD = "/x.so"}', "env.LD_PRELOAD"),
    ('env = {PATH = "/x"}', "env.PATH"),
    ('env = {PYTHONPATH = "/x"}', "env.PYTHONPATH"),
    ('env = {ENV = "/x"}', "env.ENV"),
    ('sandbox = {mode = "none"}', "sandbox.mode"),
    ('sandbox = {mode = "auto"}', "sandbox.mode"),
    ('sandbox = {network = true}', "sandbox.network"),
    ('sandbox = {run_as = "root"}', "sandbox.run_as"),
    ('limits = {processes = 0}', "limits.processes"),
    ('limits = {processes = 500}', "limits.processes"),
])
def test_sidecar_may_not_lower_the_sandbox(tmp_path, table, named):
    """A sidecar may not weaken what config.toml sets (mode, network, run_as, limits) nor set a
    variable that changes how programs load: refused, naming the key; config.toml may."""
    settings = make_settings(tmp_path, sandbox=SandboxConfig(mode="bwrap", network=False),
                             limits=ResourceLimits(processes=100))
    (settings.scripts_dir / "hello.sh.toml").write_text(table + "\n")
    catalogue = Catalogue(settings.scripts_dir, settings.scripts, settings.sandbox,
                          settings.limits)
    with pytest.raises(MetadataError, match=rf"hello\.sh\.toml\.{named}: .*config\.toml"):
        catalogue.resolve("hello.sh")
    trusted = Catalogue(settings.scripts_dir, {"hello.sh": tomllib.loads(table)},
                        settings.sandbox, settings.limits)
    assert trusted.resolve("hello.sh").name == "hello.sh"


def test_sidecar_may_tighten_the_sandbox(tmp_path):
    """What a sidecar may set: a stronger mode, no network, lower limits, plain variables."""
    settings = make_settings(tmp_path, limits=ResourceLimits(processes=100))
    (settings.scripts_dir / "hello.sh.toml").write_text(
        'sandbox = {mode = "bwrap", network = false}\nlimits = {processes = 50, '
        'open_files = 64}\nenv = {GREETING = "hi", PATHS_FILE = "x"}\n')
    script = Catalogue(settings.scripts_dir, {}, settings.sandbox,
                       settings.limits).resolve("hello.sh")
    assert script.sandbox == {"mode": "bwrap", "network": False}
    assert script.limits == {"processes": 50, "open_files": 64}
    assert script.sidecar_sha256 is not None
