"""etcd stopped under load: the established topology keeps serving.

Three topologies run at once (a standalone server, a two-stage chain, a
master with a worker) while callers call them without a pause. etcd is
stopped for ``PYLM_OUTAGE_SECONDS`` (10 s in the suite, over three times the lease's
TTL; 60 s times PYLM_SOAK in soak runs, ten minutes with scripts/soak.sh)
and started again: no call may fail meanwhile, and every server must be
registered again within 2 s of etcd's return.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from prerequisites import needs_etcd
from servers import Doubler, Echo, Last, Step

from pylm.base import BaseServer
from pylm.chained import LoopClient
from pylm.parallel import Client as ParallelClient
from pylm.parallel import Master
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Client
from pylm.testing import SOAK, wait_for

OUTAGE = float(os.environ.get("PYLM_OUTAGE_SECONDS") or (60 * SOAK if SOAK > 1 else 10))
BACK_WITHIN = 2.0  # seconds from etcd's return to every server registered again
TTL = 3.0


class Load:
    """Callers that call without a pause, counting calls and keeping failures."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failures: list[tuple[str, BaseException]] = []
        self.calls: dict[str, int] = {}
        self._threads: list[threading.Thread] = []

    def run(self, what: str, call: Callable[[int], None]) -> None:
        self.calls[what] = 0

        def loop() -> None:
            n = 0
            while not self.done.is_set():
                try:
                    call(n)
                    self.calls[what] += 1
                except BaseException as exc:
                    self.failures.append((what, exc))
                n += 1

        thread = threading.Thread(target=loop, name=f"load-{what}")
        thread.start()
        self._threads.append(thread)

    def progress(self) -> dict[str, int]:
        return dict(self.calls)

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        for thread in self._threads:
            thread.join(30)


@needs_etcd
@pytest.mark.timeout(OUTAGE + 120)
def test_etcd_stopped_under_load_fails_no_call_and_servers_register_again() -> None:
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="outage", timeout=2) as registry:
        options = {"registry": registry, "ttl": TTL, "log_stdout": False}
        servers: list[BaseServer] = [
            Echo("echo", **options),
            Last("last", **options),
            Step("step", next_call="last.done", **options),
            Master("master", heartbeat=0.5, **options),
        ]
        for server in servers:
            server.start(background=True)
        worker = Doubler("doubler", "master", heartbeat=0.5, **options)
        worker.start(background=True)
        servers.append(worker)
        load = Load()
        try:
            with (
                Client("echo", registry=registry, timeout=5) as echo,
                LoopClient("step", registry=registry, timeout=5) as chain,
                ParallelClient("master", registry=registry, timeout=5) as parallel,
            ):

                def call_echo(n: int) -> None:
                    assert echo.job("echo", b"%d" % n) == b"%d" % n

                def call_chain(n: int) -> None:
                    assert list(chain.job("tag", [b"%d" % n])) == [b"%d>step>done" % n]

                def call_parallel(n: int) -> None:
                    assert parallel.eval("double", b"%d" % n) == b"%d" % n * 2

                with load:
                    load.run("standalone", call_echo)
                    load.run("chained", call_chain)
                    load.run("parallel", call_parallel)
                    wait_for(
                        lambda: min(load.progress().values()) > 10 or bool(load.failures),
                        20,
                        "calls on every topology",
                    )
                    assert load.failures == [], load.failures[:5]

                    etcd.stop()
                    stopped = time.monotonic()
                    before = load.progress()
                    registrations = [s.registration for s in servers]
                    assert all(r is not None for r in registrations)
                    wait_for(
                        lambda: all(r.failures > 0 for r in registrations if r is not None),
                        TTL + 10,
                        "every keep-alive noticing the outage",
                    )
                    # The outage lasts its full length while the calls go on.
                    threading.Event().wait(max(0.0, OUTAGE - (time.monotonic() - stopped)))
                    during = load.progress()
                    assert load.failures == [], load.failures[:5]
                    assert all(during[k] > before[k] for k in before), (before, during)

                    etcd.start()
                    back = time.monotonic()
                    wait_for(
                        lambda: all(r.registered for r in registrations if r is not None),
                        BACK_WITHIN + 5,
                        "every server registered again",
                    )
                    again = time.monotonic() - back
                    names = {r.name for r in registry.instances()}
                    assert names == {"echo", "step", "last", "master", "doubler"}
                    assert again <= BACK_WITHIN, (
                        f"registered again {again:.2f} s after etcd's return"
                    )
                    after = load.progress()
                    wait_for(
                        lambda: all(load.progress()[k] > after[k] for k in after),
                        10,
                        "calls going on after etcd's return",
                    )
        finally:
            for server in reversed(servers):
                server.stop()
        assert load.failures == [], load.failures[:5]
