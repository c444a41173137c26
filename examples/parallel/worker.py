"""A worker of the master ``master``, with one function, ``square``.

Run: python examples/parallel/worker.py NAME [FOLDER]

Start as many as you like, with different names. Without FOLDER the worker
finds the master in the registry (``PYLM_REGISTRY``); with FOLDER it connects
to the master's ipc:// endpoint in that folder.
"""

import sys
import time

from pylm.parallel import Worker


class MyWorker(Worker):
    def square(self, message):
        time.sleep(0.05)  # the job's work: meanwhile the other workers take the next jobs
        number = int(message)
        return b"%s: %d squared is %d" % (self.name.encode(), number, number * number)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "worker1"
    if len(sys.argv) > 2:
        worker = MyWorker(name, "master", f"ipc://{sys.argv[2]}/workers")
    else:
        worker = MyWorker(name, "master")
    try:
        worker.start()
    except KeyboardInterrupt:
        pass
