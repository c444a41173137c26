"""Pipelines that fan out and in: a Hub handing a stage's jobs to workers,
branches chosen by handle_stream, a tee's copies, a Sink fed by several
stages. Real sockets; the registry tests use a real etcd."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import pytest
from helpers import ANY
from servers import Last, Step

from pylm.chained import LastServer, LoopClient, Server, Sink
from pylm.errors import RemoteError
from pylm.parallel import Hub, Worker
from pylm.registry import Registry

BEAT = 0.2


class Router(Server):
    """Even numbers to the 'even' stage, odd ones to 'odd'."""

    def parse(self, message: bytes) -> bytes:
        return message

    def handle_stream(self, message: bytes) -> tuple[str, bytes]:
        if message == b"bad":
            raise ValueError("no branch for b'bad'")
        return ("even" if int(message) % 2 == 0 else "odd.mark"), message


class Mark(Server):
    def mark(self, message: bytes) -> bytes:
        return message + b">" + self.name.encode()


class Collect(Sink):
    """Answers clients; keeps what comes without a route (a tee's copies)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.kept: list[bytes] = []
        self.lock = threading.Lock()

    def done(self, message: bytes) -> bytes:
        with self.lock:
            self.kept.append(message)
        return message + b">done"


class Tagger(Worker):
    def work(self, message: bytes) -> bytes:
        return message + b">" + self.name.encode()

    def split(self, message: bytes) -> Iterator[bytes]:
        for number in range(int(message.split(b">")[0]) % 4):
            yield message + b":%d" % number

    def fail(self, message: bytes) -> bytes:
        raise ValueError(f"cannot {message!r}")


class Squares(Hub):
    """Scatter b"3" into 0, 1, 2; gather their squares into one sum."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sums: dict[int, int] = {}

    def scatter(self, message: bytes) -> Iterable[bytes]:
        return [b"%d" % n for n in range(int(message))]

    def gather(self, message: bytes) -> Iterable[bytes]:
        job = self.gathering.job
        self.sums[job] = self.sums.get(job, 0) + int(message) ** 2
        if self.gathering.last:
            yield b"%d" % self.sums.pop(job)


class Echo(Worker):
    def work(self, message: bytes) -> bytes:
        return message


def hub_to(
    next_address: str | list[str] | None, next_call: str, name: str = "hub", cls: type[Hub] = Hub
) -> Hub:
    """A hub on free ports, before the stage at ``next_address``."""
    return cls(
        name, ANY, next_address, next_call, ANY,
        workers_address=ANY, heartbeat=BEAT, log_stdout=False,
    )  # fmt: skip


def client_of(first: Server, last: LastServer, **options: object) -> LoopClient:
    assert last.push and first.address and first.db
    return LoopClient(last.push, first.address, first.db, first.name, announce=False, **options)  # type: ignore[arg-type]


def workers(
    serve: Callable[[Tagger], Tagger], hub: Hub, count: int, cls: type[Worker] = Tagger
) -> None:
    for number in range(count):
        assert hub.back is not None
        serve(cls(f"w{number}", hub.name, hub.back, heartbeat=BEAT, log_stdout=False))  # type: ignore[arg-type]


def test_hub_spreads_a_stage_over_workers(serve: Callable[..., object]) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    hub = serve(hub_to(last.address, "last.done", "hub"))
    workers(serve, hub, 2)
    step = serve(Step("step", ANY, hub.address, "hub.work", ANY, log_stdout=False))
    results: dict[int, list[bytes]] = {}

    def run(number: int) -> None:
        with client_of(step, last, timeout=20) as client:
            results[number] = list(client.job("tag", [b"%d-%d" % (number, n) for n in range(300)]))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for number in range(3):
        got = sorted(results[number])
        assert sorted(r.split(b">")[0] for r in got) == sorted(
            b"%d-%d" % (number, n) for n in range(300)
        )
        assert all(r.split(b">")[1] == b"step" and r.endswith(b">done") for r in got)
    by = Counter(r.split(b">")[2] for rs in results.values() for r in rs)
    assert set(by) == {b"w0", b"w1"}


def test_hub_streams_and_errors_reach_the_client(serve: Callable[..., object]) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    for function in ("split", "fail"):
        hub = serve(hub_to(last.address, "last.done", "hub"))
        workers(serve, hub, 2)
        step = serve(
            Step(f"s{function}", ANY, hub.address, f"hub.{function}", ANY, log_stdout=False)
        )
        with client_of(step, last, timeout=20) as client:
            if function == "split":
                results = list(client.job("tag", [b"%d" % n for n in range(100)]))
                # Job n streams n % 4 items (none for some), each through the last stage.
                assert len(results) == sum(n % 4 for n in range(100))
                assert Counter(r.split(b">")[0] for r in results) == {
                    b"%d" % n: n % 4 for n in range(100) if n % 4
                }
            else:
                with pytest.raises(RemoteError, match="cannot"):
                    list(client.job("tag", [b"x"]))


def test_jobs_left_at_messages_leave_no_count_of_their_streams(
    serve: Callable[..., object],
) -> None:
    """job(..., messages=N) ends with streams half read: their items'
    counts go with the run's window, and the client goes on."""
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    hub = serve(hub_to(last.address, "last.done", "hub"))
    workers(serve, hub, 1)
    step = serve(Step("sleft", ANY, hub.address, "hub.split", ANY, log_stdout=False))
    with client_of(step, last, timeout=20) as client:
        assert len(list(client.job("tag", [b"3", b"7", b"11"], messages=1))) == 1
        assert len(list(client.job("tag", [b"3"]))) == 3  # usable on


def test_hub_scatter_gather_counts_are_exact(serve: Callable[..., object]) -> None:
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    hub = serve(hub_to(last.address, "last.done", "hub", cls=Squares))
    workers(serve, hub, 2, Echo)
    with client_of(hub, last, timeout=20) as client:
        results = list(client.job("work", [b"%d" % n for n in range(1, 40)]))
    assert sorted(results) == sorted(
        b"%d>done" % sum(k * k for k in range(n)) for n in range(1, 40)
    )
    assert hub.sums == {}


def test_branches_meet_again_in_a_sink(serve: Callable[..., object]) -> None:
    sink = serve(Collect("sink", ANY, ANY, ANY, log_stdout=False))
    even = serve(Mark("even", ANY, sink.address, "sink.done", ANY, log_stdout=False))
    odd = serve(Mark("odd", ANY, sink.address, "sink.done", ANY, log_stdout=False))
    router = serve(
        Router(
            "router",
            ANY,
            {"even.mark": even.address, "odd.mark": odd.address},
            ["even.mark", "odd.mark"],
            ANY,
            log_stdout=False,
        )
    )
    with client_of(router, sink, timeout=20) as client:
        results = list(client.job("parse", [b"%d" % n for n in range(200)]))
        with pytest.raises(RemoteError, match="no branch for b'bad'"):
            list(client.job("parse", [b"bad"]))
    assert sorted(results) == sorted(
        b"%d>%s>done" % (n, b"even" if n % 2 == 0 else b"odd") for n in range(200)
    )


def test_tee_copies_go_to_a_side_sink_and_only_the_main_line_answers(
    pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    audit = serve(Collect("audit", registry=pylm_registry, log_stdout=False))
    serve(Last("last", registry=pylm_registry, log_stdout=False))
    serve(Mark("side", next_call="audit.done", registry=pylm_registry, log_stdout=False))
    serve(
        Step(
            "step", next_call="last.done", tee="side.mark", registry=pylm_registry, log_stdout=False
        )
    )
    (record,) = pylm_registry.instances("step")
    assert record.next == "last.done" and record.tee == ["side.mark"]
    with LoopClient("step", registry=pylm_registry, announce=False, timeout=20) as client:
        results = list(client.job("tag", [b"%d" % n for n in range(100)]))
    assert sorted(results) == sorted(b"%d>step>done" % n for n in range(100))
    expected = sorted(b"%d>step>side" % n for n in range(100))
    deadline = threading.Event()
    for _ in range(100):  # the copies run on their own; wait for the last ones
        with audit.lock:
            if len(audit.kept) == 100:
                break
        deadline.wait(0.05)
    with audit.lock:
        assert sorted(audit.kept) == expected


def test_hub_by_name_in_a_registry_pipeline(
    pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    serve(Last("last", registry=pylm_registry, log_stdout=False))
    hub = serve(
        Hub("hub", next_call="last.done", registry=pylm_registry, heartbeat=BEAT, log_stdout=False)
    )
    for name in ("w1", "w2"):
        serve(Tagger(name, "hub", registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    serve(Step("step", next_call="hub.work", registry=pylm_registry, log_stdout=False))
    (record,) = pylm_registry.instances("hub")
    assert record.kind == "hub" and {"pull", "db", "workers"} <= set(record.endpoints)
    with LoopClient("step", registry=pylm_registry, announce=False, timeout=20) as client:
        results = list(client.job("tag", [b"%d" % n for n in range(300)], timeout=20))
    assert sorted(r.split(b">")[0] for r in results) == sorted(b"%d" % n for n in range(300))
    assert hub.workers == 2


def test_a_stream_through_a_hub_with_two_instances(serve: Callable[..., object]) -> None:
    """The first hub's workers stream; each job's items and its END go to one
    instance of the second hub, which sees the whole stream and ends it."""
    last = serve(Last("last", ANY, ANY, ANY, log_stdout=False))
    second = [serve(hub_to(last.address, "last.done", "hub2")) for _ in range(2)]
    for hub in second:
        workers(serve, hub, 1)
    first = serve(hub_to([hub.address for hub in second], "hub2.work", "hub1"))
    workers(serve, first, 2)
    with client_of(first, last, timeout=20) as client:
        results = list(client.job("split", [b"%d" % n for n in range(60)]))
    assert len(results) == sum(n % 4 for n in range(60))
    assert all(r.endswith(b">done") for r in results)
    assert {r.split(b">")[0].split(b":")[1] for r in results} <= {b"0", b"1", b"2"}
    assert all(hub.dispatcher.open_streams == 0 for hub in second)  # every stream ended
    assert all(hub.served > 0 for hub in second)  # both instances took streams
