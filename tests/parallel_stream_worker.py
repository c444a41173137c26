"""A streaming worker in a process of its own, for tests that kill it
mid-stream: ``python tests/parallel_stream_worker.py NAME MASTER HEARTBEAT
HANG_AFTER``, with the registry in ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``.
Its ``count`` yields ``0, 1, ...`` (as bytes) and, after ``HANG_AFTER``
items, holds the job until the process is killed."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

from pylm.parallel import Worker


class Counter(Worker):
    hang_after = -1  # items yielded before the stream hangs; -1: never

    def count(self, message: bytes) -> Iterator[bytes]:
        for number in range(int(message)):
            if number == self.hang_after:
                threading.Event().wait()  # holds the job (and beats) until killed
            yield b"%d" % number


if __name__ == "__main__":
    name, master, heartbeat = sys.argv[1], sys.argv[2], float(sys.argv[3])
    Counter.hang_after = int(sys.argv[4])
    Counter(name, master, heartbeat=heartbeat, log_stdout=False).start()
