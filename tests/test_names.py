"""Server names: one rule at every entry, and registry lookups that match
whole names only (a real etcd)."""

from __future__ import annotations

import subprocess

import pytest
from helpers import pylm_command

from pylm.errors import InvalidName
from pylm.names import NAME_RULE, check_name
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Client, Server
from pylm.testing import wait_for

VALID = ["a", "ab", "a-b", "a.b", "_x", "step1", "my_server", "0", "x" * 128]
INVALID = ["", "a/b", "../x", "my server", " a", "a ", ".", "..", ".a", "-a", "ü", "a\nb",
           "x" * 129, "a*", "a:b"]  # fmt: skip


class Named(Server):
    def who(self, message: bytes) -> bytes:
        return self.name.encode()


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name
    Named(name, "tcp://127.0.0.1:0", log_stdout=False)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_refused_at_every_entry(name: str) -> None:
    with pytest.raises(InvalidName, match="is not a valid name: use 1 to 128 ASCII letters"):
        Named(name, "tcp://127.0.0.1:0", log_stdout=False)
    with pytest.raises(InvalidName, match="is not a valid name"):
        Client("tcp://127.0.0.1:5555", name)
    assert isinstance(InvalidName("x"), ValueError)  # what the constructors raised before


def test_not_a_str() -> None:
    with pytest.raises(InvalidName, match="must be a str, got int"):
        check_name(5)


def test_lookups_match_whole_names_only(pylm_registry: Registry) -> None:
    """a, ab and a-b side by side: a client of 'a' reaches 'a' only, and a
    record that a '/' would have made a prefix match is not listed."""
    servers = [Named(name, log_stdout=False, registry=pylm_registry) for name in ("a", "ab", "a-b")]
    for server in servers:
        server.start(background=True)
    try:
        wait_for(lambda: len(pylm_registry.instances()) == 3, 10, "three servers listed")
        # A record under a/ written behind pylm's back, as a '/' in a name once made it.
        pylm_registry._call(
            pylm_registry._etcd(
                lambda client: client.put(
                    f"{pylm_registry.config.prefix}instances/a/b/0123456789ab".encode(), b"{}"
                )
            )
        )
        assert [record.name for record in pylm_registry.instances("a")] == ["a"]
        with Client("a", registry=pylm_registry, timeout=5) as client:
            assert {client.job("who", b"") for _ in range(20)} == {b"a"}
        with pytest.raises(InvalidName):
            pylm_registry.instances("a/b")
    finally:
        for server in servers:
            server.stop()


def test_the_command_line_refuses_a_bad_name(pylm_etcd: LocalEtcd, pylm_cluster: str) -> None:
    done = subprocess.run(
        pylm_command(pylm_etcd, pylm_cluster, "topology", "set", "a/b", "--next", "step2.bar"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert NAME_RULE in done.stderr, done.stderr
