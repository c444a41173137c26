"""The hub: a stage of the pipeline whose jobs (``hub.square``) run on its
workers; every result goes on to ``last.report``.

Run: python examples/hub/hub.py [FOLDER]

Without FOLDER it starts with only its name: free ports (its input, its
cache and the address workers connect to), registered in the registry
(``PYLM_REGISTRY``), where the step, the workers and the client find it.
With FOLDER it binds ipc:// endpoints in that folder instead.
"""

import sys

from pylm.parallel import Hub


def make_hub(folder=None):
    if folder is None:
        return Hub("hub", next_call="last.report")  # the last stage, by its name
    return Hub(
        "hub",
        f"ipc://{folder}/hub",  # pull_address: the step sends here
        f"ipc://{folder}/last",  # next_address: the last stage's input
        "last.report",  # next_call
        f"ipc://{folder}/hub_db",  # db_address: the hub's cache
        workers_address=f"ipc://{folder}/workers",  # where workers connect
    )


if __name__ == "__main__":
    hub = make_hub(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        hub.start()
    except KeyboardInterrupt:
        pass
