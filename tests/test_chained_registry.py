"""Pipelines whose stages start with only a name and find each other through
the registry (a real etcd, from pylm.testing's fixtures)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from pylm.chained import LoopClient
from pylm.demo import Last, Step1, Step2
from pylm.errors import RegistryError
from pylm.registry import Registry
from pylm.testing import wait_for


@pytest.mark.parametrize("order", list(itertools.permutations(["step1", "step2", "last"])))
def test_name_only_pipeline_in_any_start_order(
    pylm_registry: Registry, order: tuple[str, ...]
) -> None:
    pylm_registry.set_config("step1", next="step2.bar")  # wiring from the registry ...
    makers = {
        "step1": lambda: Step1("step1", registry=pylm_registry, log_stdout=False),
        "step2": lambda: Step2(
            "step2", next_call="last.baz", registry=pylm_registry, log_stdout=False
        ),
        "last": lambda: Last("last", registry=pylm_registry, log_stdout=False),
    }  # ... or given by the stage itself (step2)
    stages = [makers[name]() for name in order]
    try:
        for stage in stages:
            stage.start(background=True)
        with LoopClient("step1", registry=pylm_registry, announce=False) as client:
            assert list(client.job("foo", [b"a message"])) == [
                b"ACK: got it too, after you sent me a message"
            ]
        (record,) = pylm_registry.instances("step1")
        assert record.next == "step2.bar" and set(record.endpoints) == {"pull", "db"}
        assert set(pylm_registry.instances("last")[0].endpoints) == {"pull", "db", "push"}
    finally:
        for stage in stages:
            stage.stop()


def test_stage_without_next_stage_says_how_to_set_one(pylm_registry: Registry) -> None:
    stage = Step1("step1", registry=pylm_registry, log_stdout=False)
    with pytest.raises(RegistryError, match=r"pylm topology set step1 --next <server>\.<function>"):
        stage.start(background=True)
    stage.stop()


def test_live_rewiring_join_and_leave_without_losing_jobs(pylm_registry: Registry) -> None:
    last = Last("last", registry=pylm_registry, log_stdout=False)
    first_step2 = Step2("step2", next_call="last.baz", registry=pylm_registry, log_stdout=False)
    step1 = Step1("step1", next_call="step2.bar", registry=pylm_registry, log_stdout=False)
    second_step2 = Step2("step2", next_call="last.baz", registry=pylm_registry, log_stdout=False)
    produced = threading.Event()
    total = 3000

    def payloads() -> Iterator[bytes]:
        for i in range(total):
            if i == total // 3:
                produced.set()
            yield b"%d" % i

    results: list[bytes] = []
    client: LoopClient | None = None
    thread: threading.Thread | None = None
    try:
        for stage in (last, first_step2, step1):
            stage.start(background=True)
        client = LoopClient("step1", registry=pylm_registry, announce=False, max_in_flight=50)
        jobs = client.job("foo", payloads())
        thread = threading.Thread(target=lambda: results.extend(jobs))
        thread.start()
        assert produced.wait(20)
        second_step2.start(background=True)  # joins mid-stream ...
        wait_for(lambda: second_step2.address in step1.next_instances, 20, "step1 connecting to it")
        first_step2.stop()  # ... and the first one leaves
        thread.join(60)
    finally:
        if client is not None:
            client.close()
        if thread is not None:
            thread.join(60)
        for stage in (step1, first_step2, second_step2, last):
            stage.stop()
    assert sorted(results) == sorted(
        b"ACK: got it too, after you sent me %d" % i for i in range(total)
    )


def test_loop_client_follows_last_stage_instances(pylm_registry: Registry) -> None:
    """A last stage instance joining after the client started sends its
    results to that client too; when the first one leaves, nothing is lost."""
    old_last = Last("last", registry=pylm_registry, log_stdout=False)
    new_last = Last("last", registry=pylm_registry, log_stdout=False)
    step1 = Step1("step1", next_call="step2.bar", registry=pylm_registry, log_stdout=False)
    step2 = Step2("step2", next_call="last.baz", registry=pylm_registry, log_stdout=False)
    client: LoopClient | None = None
    try:
        for stage in (old_last, step2, step1):
            stage.start(background=True)
        client = LoopClient("step1", registry=pylm_registry, announce=False, max_in_flight=50)
        assert list(client.job("foo", [b"0"])) == [b"ACK: got it too, after you sent me 0"]
        new_last.start(background=True)
        wait_for(lambda: new_last.address in step2.next_instances, 20, "step2 connecting to it")
        old_last.stop()
        total = 500
        results = list(client.job("foo", (b"%d" % i for i in range(total)), timeout=20))
        assert sorted(results) == sorted(
            b"ACK: got it too, after you sent me %d" % i for i in range(total)
        )
        assert client.push_addresses == [new_last.push]
    finally:
        if client is not None:
            client.close()
        for stage in (step1, step2, new_last, old_last):
            stage.stop()
