"""A worker in a process of its own, for tests that kill it:
``python tests/parallel_worker.py NAME MASTER [HEARTBEAT [SLOTS [PAUSE]]]``, with the
registry in ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``."""

from __future__ import annotations

import sys
import time

from pylm.parallel import Worker


class Tagger(Worker):
    pause = 0.0  # s each job takes: a worker that always holds jobs

    def who(self, message: bytes) -> bytes:
        """Which worker ran the job, and the job."""
        time.sleep(self.pause)
        return self.name.encode() + b":" + message


if __name__ == "__main__":
    name, master = sys.argv[1], sys.argv[2]
    heartbeat = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    slots = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    Tagger.pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    Tagger(name, master, heartbeat=heartbeat, slots=slots, log_stdout=False).start()
