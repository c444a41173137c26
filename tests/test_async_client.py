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
from pylm.standalone import AsyncClient, Server

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
