"""A master that splits each job into parts (``scatter``) and defines no
``gather``: each part's result goes to the client as it comes, as an item of
a stream. It runs a text one line per worker job.

Run: python examples/scatter/master.py [FOLDER]

Without FOLDER it starts with only its name and registers in the registry
(``PYLM_REGISTRY``); with FOLDER it binds ipc:// endpoints in that folder.
"""

import sys

from pylm.parallel import Master


class LineMaster(Master):
    def scatter(self, message):
        """A text into one job per line that has words, each led by its
        line number: the parts' results come in any order, and say which
        line they are of."""
        lines = [line for line in message.splitlines() if line.strip()]
        return [b"%d %s" % (number, line) for number, line in enumerate(lines, 1)]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        folder = sys.argv[1]
        master = LineMaster("master", f"ipc://{folder}/front", f"ipc://{folder}/workers")
    else:
        master = LineMaster("master")
    try:
        master.start()
    except KeyboardInterrupt:
        pass
