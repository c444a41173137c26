"""The master of the streaming example: a plain Master; nothing to add.

Run: python examples/stream/master.py [FOLDER]

Without FOLDER it starts with only its name and registers in the registry
(``PYLM_REGISTRY``); with FOLDER it binds ipc:// endpoints in that folder.
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
