"""Fan-in: branches that meet again in one Sink, and two pipelines sharing it.

    router.number -+-> even.halve --+
    (handle_stream)|                |
                   +-> odd.triple --+--> sink.collect --> each job's own client
                                    |
    shout.shout --------------------+

The router sends each number down one of two branches (a Collatz step:
halve the even ones, 3n+1 the odd ones), both branches end in the same
Sink, and the Sink answers the client that sent the job. A second pipeline,
``shout``, ends in the same Sink; its client gets its own results only.

    python examples/sink/demo.py    # every server in this process, ipc:// endpoints

It runs the servers in threads of this process, runs the two clients,
then stops everything.
"""

import shutil
import tempfile

from pylm import RemoteError
from pylm.chained import LoopClient, Server, Sink


class Router(Server):
    """One result, two branches: handle_stream chooses the branch of each."""

    def number(self, message):
        return message.strip()

    def handle_stream(self, message):
        # (the next call, or only its server's name; the payload it gets there)
        if int(message) % 2 == 0:
            return "even.halve", message
        return "odd.triple", message


class Even(Server):
    def halve(self, message):
        number = int(message)
        return b"%d is even: %d / 2 = %d" % (number, number, number // 2)


class Odd(Server):
    def triple(self, message):
        number = int(message)
        return b"%d is odd: 3 * %d + 1 = %d" % (number, number, 3 * number + 1)


class Shout(Server):
    def shout(self, message):
        return message.upper()


class Collect(Sink):
    """The Sink: any number of stages send to it; it answers every job's client."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = 0  # jobs it answered, whichever way they came

    def collect(self, message):
        self.seen += 1
        return b"sink: " + message


def main():
    folder = tempfile.mkdtemp(prefix="pylm-sink-")

    def at(name):
        return f"ipc://{folder}/{name}"

    sink = Collect("sink", at("sink"), at("sink_push"), at("sink_db"))
    servers = [
        sink,
        Even("even", at("even"), at("sink"), "sink.collect", at("even_db")),
        Odd("odd", at("odd"), at("sink"), "sink.collect", at("odd_db")),
        Router(
            "router",
            at("router"),
            {"even.halve": at("even"), "odd.triple": at("odd")},  # each branch's address
            ["even.halve", "odd.triple"],  # the branches; errors go down the first one
            at("router_db"),
        ),
        Shout("shout", at("shout"), at("sink"), "sink.collect", at("shout_db")),
    ]
    started = []
    try:
        for server in servers:
            server.start(background=True)
            started.append(server)
        with LoopClient(at("sink_push"), at("router"), at("router_db"), "router") as client:
            results = list(client.job("number", [b"%d" % number for number in range(1, 9)]))
            for result in sorted(results, key=lambda result: int(result.split()[1])):
                print("Client got: ", result, flush=True)
            # An error in handle_stream (no int) reaches the client too.
            try:
                list(client.job("number", [b"seven"]))
            except RemoteError as error:
                print(
                    f"Client got an error: {error.remote_type}: {error.remote_message}", flush=True
                )
        # A second pipeline into the same sink: its client gets its own results.
        with LoopClient(
            at("sink_push"), at("shout"), at("shout_db"), "shout", announce=False
        ) as other:
            for result in sorted(other.job("shout", [b"hello", b"fan-in"])):
                print("Other client got: ", result, flush=True)
        print(f"The sink answered {sink.seen} jobs", flush=True)
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
