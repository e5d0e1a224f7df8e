"""`[cluster]` in config.toml: its keys, their defaults, and errors that name the key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from remoterun.config import ConfigError, parse

URLS = {"database_url": "postgresql://rr@db/rr", "redis_url": "redis://cache:6379/0"}


def test_without_cluster_the_server_is_one_node_on_sqlite():
    """No [cluster] section: settings.cluster is None (SQLite, one process)."""
    assert parse({}, Path(".")).cluster is None


def test_cluster_defaults_name_the_node_after_the_host():
    """node defaults to the host name, labels to none, node_timeout_s to 15."""
    cluster = parse({"cluster": URLS}, Path(".")).cluster
    assert cluster is not None
    assert (cluster.node, cluster.labels, cluster.node_timeout_s) == (
        socket.gethostname(), (), 15.0)


def test_cluster_keys_are_read():
    """node, labels (sorted, unique) and node_timeout_s are taken as given."""
    cluster = parse({"cluster": {**URLS, "node": "web-1", "labels": ["gpu", "eu", "gpu"],
                                 "node_timeout_s": 5}}, Path(".")).cluster
    assert cluster is not None
    assert (cluster.node, cluster.labels, cluster.node_timeout_s) == ("web-1", ("eu", "gpu"), 5.0)


@pytest.mark.parametrize(("body", "key"), [
    ({"redis_url": "redis://x"}, "cluster.database_url"),
    ({**URLS, "database_url": "mysql://x"}, "cluster.database_url"),
    ({**URLS, "redis_url": 3}, "cluster.redis_url"),
    ({**URLS, "node": "a b"}, "cluster.node"),
    ({**URLS, "labels": "gpu"}, "cluster.labels"),
    ({**URLS, "node_timeout_s": 0}, "cluster.node_timeout_s"),
    ({**URLS, "shards": 2}, "cluster.shards"),
])
def test_a_bad_cluster_key_is_named(body, key):
    """Each bad or unknown [cluster] key fails start-up with its name in the message."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse({"cluster": body}, Path("."))


def test_a_bad_url_is_named_without_its_password():
    """A URL of the wrong scheme is quoted in the error with its password masked."""
    with pytest.raises(ConfigError, match=r"cluster\.redis_url") as caught:
        parse({"cluster": {**URLS, "redis_url": "http://rr:hunter2@cache:6379/0"}}, Path("."))
    assert "hunter2" not in str(caught.value)
