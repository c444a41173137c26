"""The last stage: reports each result back to the client that sent the job.

Run: python examples/hub/last.py [FOLDER]

Without FOLDER it starts with only its name (free ports, registered in the
registry, ``PYLM_REGISTRY``); with FOLDER it binds ipc:// endpoints there.
"""

import sys

from pylm.chained import LastServer


class Last(LastServer):
    def report(self, message):
        return b"last got " + message


def make_last(folder=None):
    if folder is None:
        return Last("last")
    return Last(
        "last", f"ipc://{folder}/last", f"ipc://{folder}/last_push", f"ipc://{folder}/last_db"
    )


if __name__ == "__main__":
    server = make_last(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        server.start()
    except KeyboardInterrupt:
        pass
