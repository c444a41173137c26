"""The master: takes the clients' jobs and hands each one to an idle worker.

Run: python examples/parallel/master.py [FOLDER]

Without FOLDER it starts with only its name: it binds free ports and
registers them in the registry (``PYLM_REGISTRY``, e.g. from ``pylm etcd``),
where workers and clients find it. With FOLDER it binds ipc:// endpoints in
that folder instead and needs no registry (demo.py does that).
"""

import sys

from pylm.parallel import Master

if __name__ == "__main__":
    if len(sys.argv) > 1:
        folder = sys.argv[1]
        master = Master("master", f"ipc://{folder}/front", f"ipc://{folder}/workers")
    else:
        master = Master("master")
    try:
        master.start()
    except KeyboardInterrupt:
        pass
