"""remoterun/hooks.py alone: `[[hooks]]` parsing, the signature check, `match` and `params`."""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from pathlib import Path

import pytest

from remoterun.config import ConfigError, parse
from remoterun.hooks import Delivery, Hook, mapped_params, parse_hooks, unmatched, verify

# PROTOCOL.md's example, as written there.
CONTRACT = """
[[hooks]]
name = "deploy"
script = "deploy.sh"
signature = "github"
secrets = ["s3cret-one", "s3cret-two"]
delivery_header = "X-GitHub-Delivery"
match = { "header:X-GitHub-Event" = "push", "body:ref" = "refs/heads/main" }
params = { ref = "body:ref", repo = "body:repository.full_name", sha = "body:after" }
mode = "async"
wait_s = 30
priority = 0
timeout = 600.0
"""


def test_the_contract_example_parses(tmp_path: Path) -> None:
    """PROTOCOL.md's `[[hooks]]` block is read as written, its secrets kept out of repr."""
    settings = parse(tomllib.loads(CONTRACT), tmp_path)
    [hook] = settings.hooks
    assert hook.name == "deploy" and hook.signature_header == "X-Hub-Signature-256"
    assert hook.secrets == ("s3cret-one", "s3cret-two") and hook.timeout == 600.0
    assert "s3cret" not in repr(settings)


def test_secrets_file_gives_one_secret_a_line(tmp_path: Path) -> None:
    """`secrets_file` is read relative to the config, one secret a line, blanks skipped."""
    (tmp_path / "deploy.secrets").write_text("first-secret\n\n  second-secret \n")
    [hook] = parse_hooks([{"name": "d", "script": "x.sh", "signature": "gitlab",
                           "secrets_file": "deploy.secrets"}], tmp_path)
    assert hook.secrets == ("first-secret", "second-secret")


@pytest.mark.parametrize(("change", "key"), [
    ({"signature": "md5"}, "hooks[0].signature"),
    ({"secrets": []}, "hooks[0].secrets"),
    ({"mode": "fire"}, "hooks[0].mode"),
    ({"params": {"ref": "cookie:x"}}, "hooks[0].params.ref"),
    ({"match": {"body:ref": {"a": 1}}}, "hooks[0].match.body:ref"),
    ({"timestamp_header": "X-Timestamp"}, "hooks[0]"),
    ({"nope": 1}, "hooks[0].nope"),
])
def test_config_errors_name_the_key_never_the_secret(tmp_path: Path, change: dict[str, object],
                                                     key: str) -> None:
    """Each mistake is a ConfigError naming its key; no secret is repeated."""
    item = {"name": "d", "script": "x.sh", "signature": "github",
            "secrets": ["top-secret-value"], **change}
    with pytest.raises(ConfigError) as caught:
        parse({"hooks": [item]}, tmp_path)
    assert str(caught.value).startswith(key) and "top-secret-value" not in str(caught.value)


def _hook(**changes: object) -> Hook:
    base: dict[str, object] = {"name": "h", "script": "x.sh", "signature": "hmac-sha256",
                               "secrets": ["k1", "k2"], "signature_header": "X-Sig"}
    [hook] = parse_hooks([{**base, **changes}], Path("."))
    return hook


def test_generic_hmac_takes_either_secret_with_or_without_prefix() -> None:
    """hmac-sha256: the hex digest of the body under any secret, `sha256=` optional, any case."""
    hook, body = _hook(), b'{"a": 1}'
    digest = hmac.new(b"k2", body, hashlib.sha256).hexdigest()
    for given in (digest, f"sha256={digest}", digest.upper()):
        assert verify(hook, {"X-Sig": given}, body, 0.0) is None
    assert verify(hook, {"X-Sig": digest}, body + b" ", 0.0) == "signature wrong"
    assert verify(hook, {}, body, 0.0) == "signature missing"


def test_timestamp_is_signed_and_bounded() -> None:
    """With timestamp_header, "<ts>.<body>" is signed and ts must be within max_age_s."""
    hook, body = _hook(timestamp_header="X-Ts", max_age_s=10), b"{}"
    digest = hmac.new(b"k1", b"1000." + body, hashlib.sha256).hexdigest()
    headers = {"X-Sig": digest, "X-Ts": "1000"}
    assert verify(hook, headers, body, 1005.0) is None
    assert verify(hook, headers, body, 1011.0) == "timestamp outside max_age_s"
    assert verify(hook, {**headers, "X-Ts": "nan"}, body, 1000.0) is not None
    assert verify(hook, {**headers, "X-Ts": "1001"}, body, 1001.0) == "signature wrong"


def test_match_and_params_read_headers_query_and_body_paths() -> None:
    """`match` names the first key that misses (true is never 1); `params` leaves out what
    the request lacks and passes values as they are."""
    hook = _hook(match={"body:a.b": [1, 2], "query:q": "x", "body:flag": True},
                 params={"p": "body:list.1", "h": "header:X-H", "gone": "body:nope"})
    delivery = Delivery({"X-H": "v"}, {"q": "x"}, {"a": {"b": 2}, "flag": True,
                                                     "list": ["z", "$(id)"]})
    assert unmatched(hook, delivery) is None
    assert mapped_params(hook, delivery) == {"p": "$(id)", "h": "v"}
    assert unmatched(hook, Delivery({}, {"q": "x"}, {"a": {"b": 2}, "flag": 1})) == "body:flag"
    assert unmatched(hook, Delivery({}, {}, {"a": {"b": 3}})) == "body:a.b"


def test_the_readme_hook_examples_parse(tmp_path: Path) -> None:
    """Every `[[hooks]]` block of README.md is a valid hook (its secrets file made here)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (tmp_path / "deploy.secrets").write_text("a-secret\n")
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[[hooks]]" in b]
    assert len(blocks) >= 3
    for block in blocks:
        text = block.replace("/etc/remoterun/deploy.secrets", str(tmp_path / "deploy.secrets"))
        assert parse(tomllib.loads(text), tmp_path).hooks
