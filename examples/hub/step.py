"""The first stage: tidies each number up, then on to ``hub.square``.

Run: python examples/hub/step.py [FOLDER]

Without FOLDER it starts with only its name: it binds free ports, registers
them in the registry (``PYLM_REGISTRY``, e.g. from ``pylm etcd``) and finds
the hub there by its name. With FOLDER it binds ipc:// endpoints in that
folder and sends to the hub's; no registry needed (demo.py does that).
"""

import sys

from pylm.chained import Server


class Step(Server):
    def number(self, message):
        return message.strip()


def make_step(folder=None):
    if folder is None:
        return Step("step", next_call="hub.square")  # the hub, by its name
    return Step(
        "step",
        f"ipc://{folder}/step",
        f"ipc://{folder}/hub",
        "hub.square",
        f"ipc://{folder}/step_db",
    )


if __name__ == "__main__":
    server = make_step(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        server.start()
    except KeyboardInterrupt:
        pass
