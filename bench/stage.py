"""What counting costs a chained stage: one stage, fed faster than it can
serve, with metrics on and off.

Run from the repository root::

    python -m bench.stage                 # 9 rounds of 2 s, under two minutes
    python -m bench.stage --quick         # a smoke run

What is measured
    One :class:`pylm.chained.Server` that passes 100-byte payloads on
    unchanged, in a process of its own, alone on one CPU. A feeder process
    sends it ready-made one-frame requests as fast as it can; the parent
    reads what the stage passes on. Feeder and parent share the other CPU
    and each need less time per message than the stage, so the stage is the
    bottleneck: its rate is the measurement. Each round runs a fresh stage
    with metrics on and one with metrics off, in alternating order, and
    reports:

    * the stage's jobs per second over the window (the results it passed
      on, those of a BATCH one by one);
    * the CPU time its serving thread spent per job (the clock of that
      one thread, read at both ends of the window), which the machine's
      other tenants disturb less than the rate.

Why not only ``bench.pipeline``
    That one runs four processes on two cores, whose rounds differ by up to
    30 %; what one stage spends per message is lost in it. Here the stage
    has a core of its own.

    Needs Linux (``sched_setaffinity``, thread CPU clocks) and two CPUs; on
    one CPU it runs unpinned, and says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection

import zmq

from bench.harness import BenchError, Children, expect, machine, send
from bench.processes import exit_on_stop

PAYLOAD = 100
MODES = ("on", "off")  # metrics
_TARGET = b"step.foo"
_ROUTE = b"bench-route"


def _pin(cpu: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def stage_main(mode: str, downstream: str, conn: Connection) -> None:
    """The stage: serves until the parent goes; answers ``("read",)`` with
    ``("cpu", serving thread's CPU seconds, messages served)``."""
    _pin(1)
    from pylm.chained import Server

    class Step(Server):
        def foo(self, message: bytes) -> bytes:
            return message

    server = Step(
        "step", "tcp://127.0.0.1:0", downstream, "sink.bar", "tcp://127.0.0.1:0",
        log_stdout=False, metrics=mode == "on",
    )  # fmt: skip
    server.start(background=True)
    serving = server._thread  # the serving thread: its CPU clock is the measure
    assert serving is not None and serving.ident is not None
    clock = time.pthread_getcpuclockid(serving.ident)
    conn.send(("ready", server.address))
    try:
        while conn.recv()[0] == "read":
            conn.send(("cpu", time.clock_gettime(clock), server.served))
    except (EOFError, OSError):
        pass
    os._exit(0)


def feeder_main(address: str, conn: Connection) -> None:
    """Sends the same one-frame request to ``address`` until told to stop."""
    _pin(0)
    threading.Thread(target=exit_on_stop, args=(conn,), daemon=True).start()
    from pylm import protocol

    frames = protocol.encode(
        protocol.REQUEST, 1, b"x" * PAYLOAD, _TARGET, _ROUTE, time.time() + 86400
    )
    assert len(frames) == 1
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.connect(address)
    conn.send(("ready",))
    push, message = socket.send, frames[0]
    while True:
        push(message)


def carried(message: bytes) -> int:
    """How many results a message the stage passed on carries: those of a
    BATCH (the stage sends the results of the jobs it read in a row
    together), else one."""
    from pylm import protocol

    if message[3] == protocol.BATCH:  # the head's kind byte
        return len(protocol.unpack_batch(message))
    return 1


def measure(
    children: Children, mode: str, sink: zmq.Socket, port: int, warmup: float, duration: float
) -> tuple[float, float]:
    """(jobs/s, serving-thread µs per job) of a fresh stage."""
    stage = children.start(f"stage-{mode}", stage_main, mode, f"tcp://127.0.0.1:{port}")
    (address,) = expect(stage, "ready", 30)
    feeder = children.start("feeder", feeder_main, address)
    expect(feeder, "ready", 30)
    try:
        recv = sink.recv
        until = time.monotonic() + warmup
        while time.monotonic() < until:
            if sink.poll(1000):
                recv()
        send(stage, ("read",))
        cpu0, served0 = expect(stage, "cpu", 10)
        began = time.monotonic()
        until, count, messages = began + duration, 0, 0
        while True:
            if not sink.poll(5000):
                raise BenchError(f"the stage ({mode}) passed nothing on for 5 s")
            count += carried(recv())
            messages += 1
            if not messages & 255 and time.monotonic() >= until:
                break
        rate = count / (time.monotonic() - began)
        send(stage, ("read",))
        cpu1, served1 = expect(stage, "cpu", 10)
    finally:
        children.stop([feeder, stage])
    while sink.poll(200):  # what was still on its way
        recv()
    return rate, (cpu1 - cpu0) / max(1, served1 - served0) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured (2)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up (0.5)")
    parser.add_argument("--quick", action="store_true", help="1 round of 0.3 s")
    parser.add_argument("--json", metavar="PATH", help="also write every round to PATH")
    args = parser.parse_args(argv)
    rounds, duration, warmup = (
        (1, 0.3, 0.1) if args.quick else (args.rounds, args.duration, args.warmup)
    )
    if not hasattr(os, "sched_setaffinity") or not hasattr(time, "pthread_getcpuclockid"):
        print("bench.stage needs Linux", file=sys.stderr)
        return 2
    info = machine(("pyzmq", "pylm"))
    print("Machine: " + "; ".join(f"{key}: {value}" for key, value in info.items()))
    if len(os.sched_getaffinity(0)) < 2:
        print("one CPU: not pinned, the stage shares it with the feeder")
    _pin(0)
    sink = zmq.Context.instance().socket(zmq.PULL)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    children = Children(multiprocessing.get_context("spawn"))
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpus: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for index in range(rounds):
            for mode in MODES if index % 2 == 0 else MODES[::-1]:
                rate, cpu = measure(children, mode, sink, port, warmup, duration)
                rates[mode].append(rate)
                cpus[mode].append(cpu)
                print(
                    f"round {index + 1}/{rounds} metrics {mode}: {rate:,.0f} jobs/s,"
                    f" {cpu:.2f} µs CPU/job",
                    file=sys.stderr,
                )
    except BenchError as exc:
        print(f"bench.stage: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        sink.close(0)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    cpu_on, cpu_off = statistics.median(cpus["on"]), statistics.median(cpus["off"])
    paired = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    print(
        f"\nOne chained stage, {PAYLOAD} B payloads, median of {rounds} round(s) of"
        f" {duration:g} s\n\n"
        "| metrics | jobs/s | serving thread, µs CPU/job |\n|---|---:|---:|\n"
        f"| on | {on:,.0f} | {cpu_on:.2f} |\n| off | {off:,.0f} | {cpu_off:.2f} |\n\n"
        f"Throughput lost to metrics: {100 * (1 - on / off):.1f} %"
        f" (median of the rounds' own ratios: {100 * (1 - statistics.median(paired)):.1f} %);"
        f" CPU per job: +{cpu_on - cpu_off:.2f} µs ({100 * (cpu_on / cpu_off - 1):.1f} %)"
    )
    if args.json:
        every = {"machine": info, "duration_s": duration, "rounds_per_s": rates, "cpu_us": cpus}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(every, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
