"""A worker of the hub ``hub``, with one function, ``square``. Its results
say which worker ran them.

Run: python examples/hub/worker.py NAME [FOLDER]

Start as many as you like, with different names. Without FOLDER the worker
finds the hub in the registry (``PYLM_REGISTRY``); with FOLDER it connects
to the hub's ipc:// workers endpoint in that folder.
"""

import sys
import time

from pylm.parallel import Worker


class Squarer(Worker):
    def square(self, message):
        number = int(message)
        time.sleep(0.05)  # the job's work: meanwhile the other worker takes the next job
        return b"%s: %d squared is %d" % (self.name.encode(), number, number * number)


def make_worker(name, folder=None):
    if folder is None:
        return Squarer(name, "hub")  # the hub, by its name
    return Squarer(name, "hub", f"ipc://{folder}/workers")


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "w1"
    worker = make_worker(name, sys.argv[2] if len(sys.argv) > 2 else None)
    try:
        worker.start()
    except KeyboardInterrupt:
        pass
