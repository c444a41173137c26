"""A server to watch: it counts what it does and serves it at /metrics.

Run it with only a name (it registers in etcd, so that ``pylm sd``, ``pylm top``
and clients find it), then give it some calls with load.py::

    export PYLM_REGISTRY=etcd://127.0.0.1:2379      # pylm etcd runs one
    pylm run examples/monitoring/app.py:Greeter --name greeter
    python examples/monitoring/load.py              # in another terminal: 50 calls a second
    pylm top                                        # and in a third
"""

import time

from pylm.standalone import Server


class Greeter(Server):
    def hello(self, message):
        if not message:
            raise ValueError("hello needs a name")  # an error to see on the dashboards
        time.sleep(0.001)  # some work, for the latency panels
        return b"hello " + message
