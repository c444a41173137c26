"""A worker whose function is a generator: each item it yields reaches the
client as soon as it is made (a streaming job).

Run: python examples/stream/worker.py NAME [FOLDER]
"""

import sys
import time

from pylm.parallel import Worker


class Streamer(Worker):
    def countdown(self, message):
        """Yields N, N-1, ..., 1, then b'liftoff'. Deterministic, as a
        streaming function must be: should this worker die mid-stream, the
        master runs the job again on another worker and passes on only the
        items the client has not had yet."""
        for number in range(int(message), 0, -1):
            time.sleep(0.1)  # the work of one item: the client has the ones before already
            yield b"%d" % number
        yield b"liftoff"


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "worker1"
    if len(sys.argv) > 2:
        worker = Streamer(name, "master", f"ipc://{sys.argv[2]}/workers")
    else:
        worker = Streamer(name, "master")
    try:
        worker.start()
    except KeyboardInterrupt:
        pass
