"""The asyncio client: many calls in flight, answers matched to calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from pylm import protocol
from pylm.errors import RemoteError, RequestTimeout, UnknownFunction
from pylm.registry import Registry
from pylm.standalone import AsyncClient, Server
from pylm.testing import wait_for

Serve = Callable[[Any], Any]


class Echo(Server):
    def echo(self, message: bytes) -> bytes:
        return b"echo " + message

    def fail(self, message: bytes) -> bytes:
        raise KeyError(message)


def echo_server(serve: Serve) -> Any:
    return serve(Echo("echo", "tcp://127.0.0.1:0", log_stdout=False))


def test_many_calls_in_flight(serve: Serve) -> None:
    server = echo_server(serve)

    async def main() -> list[bytes]:
        async with AsyncClient(server.address, "echo") as client:
            return await asyncio.gather(*(client.job("echo", b"%d" % i) for i in range(500)))

    assert asyncio.run(main()) == [b"echo %d" % i for i in range(500)]


def test_answers_out_of_order_reach_their_calls(raw_socket: Callable[[int], zmq.Socket]) -> None:
    """A server that answers in reverse order: every call still gets its own."""
    router = raw_socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    count = 20

    def reverse_server() -> None:
        requests = [router.recv_multipart() for _ in range(count)]
        for identity, *frames in reversed(requests):
            request = protocol.decode(frames)
            answer = protocol.reply_head(request.msg_id) + request.payload + b"!"
            router.send_multipart([identity, answer])

    thread = threading.Thread(target=reverse_server)
    thread.start()

    async def main() -> list[bytes]:
        async with AsyncClient(f"tcp://127.0.0.1:{port}", "any") as client:
            return await asyncio.gather(*(client.job("f", b"%d" % i) for i in range(count)))

    assert asyncio.run(main()) == [b"%d!" % i for i in range(count)]
    thread.join(5)


def test_typed_errors_and_ping(serve: Serve) -> None:
    server = echo_server(serve)

    async def main() -> None:
        async with AsyncClient(server.address, "echo") as client:
            with pytest.raises(UnknownFunction, match="unknown function 'nope' on server 'echo'"):
                await client.job("nope", b"x")
            with pytest.raises(RemoteError) as info:
                await client.job("fail", b"k")
            assert info.value.remote_type == "KeyError"
            with pytest.raises(TypeError, match="payload must be bytes, got str"):
                await client.job("echo", "text")  # type: ignore[arg-type]
            assert (await client.ping())["name"] == "echo"
            assert await client.job("echo", b"ok") == b"echo ok"

    asyncio.run(main())


def test_timeout_then_usable(serve: Serve) -> None:
    release = threading.Event()

    class Slow(Server):
        def wait(self, message: bytes) -> bytes:
            release.wait(10)
            return message

    server = serve(Slow("slow", "tcp://127.0.0.1:0", log_stdout=False))

    async def main() -> None:
        async with AsyncClient(server.address, "slow") as client:
            with pytest.raises(RequestTimeout, match=r"to 'wait' within 0\.2 s"):
                await client.job("wait", b"1", timeout=0.2)
            release.set()
            assert await client.job("wait", b"2") == b"2"
            assert client.dropped == 1

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_each_call_times_out_at_its_own_deadline(serve: Serve) -> None:
    """Calls in flight with other timeouts: a later call with a shorter
    timeout ends at its own deadline, not at an earlier call's; the calls
    that time out together all end; a call answered in time is not failed."""
    release = threading.Event()

    class Slow(Server):
        def wait(self, message: bytes) -> bytes:
            if message != b"quick":
                release.wait(10)
            return message

    server = serve(Slow("slow", "tcp://127.0.0.1:0", log_stdout=False, concurrency=8))

    async def main() -> None:
        async with AsyncClient(server.address, "slow") as client:
            loop = asyncio.get_running_loop()
            long = asyncio.ensure_future(client.job("wait", b"long", timeout=8))
            await asyncio.sleep(0)  # sent first, with the later deadline
            began = loop.time()
            with pytest.raises(RequestTimeout, match=r"within 0\.3 s"):
                await client.job("wait", b"short", timeout=0.3)
            assert loop.time() - began < 2  # not at the 8 s of the call before it
            together = [client.job("wait", b"%d" % i, timeout=0.2) for i in range(5)]
            outcomes = await asyncio.gather(*together, return_exceptions=True)
            assert all(isinstance(outcome, RequestTimeout) for outcome in outcomes)
            assert await client.job("wait", b"quick", timeout=0.5) == b"quick"
            assert not long.done()
            release.set()
            assert await long == b"long"

    asyncio.run(main())


def test_close_fails_calls_in_flight(free_tcp_address: str) -> None:
    async def main() -> None:
        client = AsyncClient(free_tcp_address, "nobody")
        call = asyncio.ensure_future(client.job("f", b"x"))
        await asyncio.sleep(0)  # let the call register; nothing answers it
        await client.close()
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(call, 5)
        with pytest.raises(RuntimeError, match="closed"):
            await client.job("f", b"x")

    asyncio.run(main())


def test_more_calls_than_the_queue_holds(ipc_address: str) -> None:
    """Calls beyond ZeroMQ's high-water mark wait for room instead of failing."""
    count = 3000  # the DEALER queues 1000 while no server is there

    async def main() -> list[bytes]:
        async with AsyncClient(ipc_address, "echo", timeout=30) as client:
            calls = [asyncio.ensure_future(client.job("echo", b"%d" % i)) for i in range(count)]
            for _ in range(10_000):  # let every call send or start waiting for room
                if len(client._pending) == count:
                    break
                await asyncio.sleep(0)
            assert len(client._pending) == count
            with Echo("echo", ipc_address, log_stdout=False):
                return await asyncio.gather(*calls)

    assert asyncio.run(main()) == [b"echo %d" % i for i in range(count)]


class Held(Server):
    """Answers a call of ``hold`` with its message once ``release`` is set
    (``arrived``: the calls that reached it), one of ``who`` at once with
    its ``label``."""

    def __init__(self, name: str, label: bytes, release: threading.Event, **options: Any) -> None:
        super().__init__(name, **options)
        self.label = label
        self.release = release
        self.arrived = 0

    def hold(self, message: bytes) -> bytes:
        self.arrived += 1
        self.release.wait(60)  # a bound for a failing test only
        return message

    def who(self, message: bytes) -> bytes:
        return self.label


def test_calls_in_flight_on_sockets_retired_together_all_get_their_answers(
    serve: Serve, pylm_registry: Registry
) -> None:
    """Ten instances of a server that answers only once released, three
    calls in flight on each from an AsyncClient by name. One instance
    leaves the registry (it still serves), and the next call makes the
    client drop it: its sockets to all ten instances are retired at once,
    more than the eight idle ones it keeps, but each has calls in flight
    and is read on. Released, every call gets its own answer, once,
    the leaving instance's too."""
    instances = 10
    release = threading.Event()
    labels = {b"%d" % n for n in range(instances)}
    servers = [
        serve(Held("held", label, release, registry=pylm_registry, log_stdout=False))
        for label in sorted(labels)
    ]
    wait_for(lambda: len(pylm_registry.instances("held")) == instances, 20, "every instance")
    registration = servers[0].registration
    assert registration is not None
    leaving = registration.record.endpoints["rep"]

    async def main() -> tuple[list[bytes | BaseException], int]:
        async with AsyncClient("held", registry=pylm_registry, timeout=10) as client:
            seen: set[bytes] = set()
            for _ in range(1000):  # until the client's socket to each instance is connected
                if seen == labels:
                    break
                seen.add(await client.job("who", b""))
            assert seen == labels
            calls = [
                asyncio.ensure_future(client.job("hold", b"%d" % n)) for n in range(3 * instances)
            ]
            try:
                await asyncio.to_thread(
                    wait_for, lambda: all(s.arrived for s in servers), 20, "a call on each"
                )
                await asyncio.to_thread(registration.close)  # leaves; serves on
                peers = client._peers
                assert peers is not None
                await asyncio.to_thread(
                    wait_for, lambda: peers.changed, 10, "the client hearing of it"
                )
                calls.append(asyncio.ensure_future(client.job("hold", b"after")))
                await asyncio.sleep(0)  # that call starts: the instance is dropped
                assert leaving not in client.endpoints
            finally:
                release.set()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            return outcomes, client.dropped

    outcomes, dropped = asyncio.run(main())
    assert outcomes == [b"%d" % n for n in range(3 * instances)] + [b"after"]
    assert dropped == 0
