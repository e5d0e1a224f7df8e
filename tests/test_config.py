"""config.toml: the shipped file loads, errors name the key, flags override, serve refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remoterun import config
from remoterun.catalogue import Catalogue

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_and_its_scripts_are_valid():
    """The repository's config.toml and example scripts are usable as shipped."""
    settings = config.load(ROOT / "config.toml")
    assert settings.scripts_dir == ROOT / "scripts" and settings.workers >= 1
    catalogue = Catalogue(settings.scripts_dir, settings.scripts)
    catalogue.check()
    names = catalogue.names()
    for name in ("hello.sh", "count.sh", "ask.sh", "fail.sh", "colors.sh", "greet.py"):
        assert name in names
    assert catalogue.resolve("greet.py").params is not None


@pytest.mark.parametrize(("text", "words"), [
    ("[engine]\nworkers = \"four\"\n", "engine.workers: expected a number, got 'four'"),
    ("[engine]\nworkers = 2.5\n", "engine.workers: expected an integer"),
    ("[engine]\nwrokers = 2\n", "engine.wrokers: unknown key"),
    ("[bogus]\nx = 1\n", "bogus.x: unknown key"),
    ("[archive]\ngzip_level = 12\n", "archive.gzip_level: must be 1..9"),
    ("[[tokens]]\nname = \"a\"\ntoken = \"t\"\nrole = \"god\"\n", "tokens[0].role"),
    ("[server]\nport = -1\n", "server.port: must be positive"),
    ("[server]\nlog_level = \"loud\"\n", "server.log_level: one of ['debug', 'info'"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, words):
    """Each bad key or value gives a ConfigError that names it."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert words in str(error.value)


def test_overrides_win(tmp_path):
    """Command-line values override the file; None means not given."""
    path = tmp_path / "config.toml"
    path.write_text("[server]\nport = 9000\nhost = \"127.0.0.1\"\n")
    settings = config.load(path, {"port": 9100, "host": None})
    assert (settings.port, settings.host) == (9100, "127.0.0.1")


def test_serve_refuses_a_bad_config_in_one_line(tmp_path):
    """`remoterun serve` with a bad config exits non-zero with one line naming the key."""
    path = tmp_path / "config.toml"
    path.write_text("[engine]\nworkers = 0\n")
    result = subprocess.run([sys.executable, "-m", "remoterun", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "remoterun: config error: engine.workers: must be positive, got 0"]


def test_serve_refuses_bad_script_metadata(tmp_path):
    """Malformed script metadata in config.toml stops the server with the key named."""
    (tmp_path / "scripts").mkdir()
    path = tmp_path / "config.toml"
    path.write_text("[scripts.\"x.sh\"]\ntimeout_s = \"soon\"\n")
    result = subprocess.run([sys.executable, "-m", "remoterun", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "timeout_s" in result.stderr
