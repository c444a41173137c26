"""Calls the server of app.py by name, steadily, until stopped (Ctrl-C, or
``kill`` when started with ``&``): mostly answered, one call in fifty an
error, so that the metrics, ``pylm top`` and the dashboards have something to
show. While no instance answers (the server stopped or restarting), it counts
the calls that time out and goes on.

Run: python examples/monitoring/load.py [CALLS_PER_SECOND] [NAME]   (50, greeter)
"""

import sys
import time

from pylm import RemoteError, RequestTimeout
from pylm.standalone import Client


def main(rate, name):
    answered = failed = 0
    began = time.monotonic()
    with Client(name, wait=10) as client:  # by name, in the registry of PYLM_REGISTRY
        try:
            while True:
                message = b"" if (answered + failed) % 50 == 49 else b"world"
                try:
                    client.job("hello", message)
                    answered += 1
                except RemoteError:
                    failed += 1
                except RequestTimeout:
                    failed += 1  # no instance answered in time: it shows as such in pylm top
                # The next call at its time: a steady rate, whatever the answers take.
                time.sleep(max(0.0, began + (answered + failed) / rate - time.monotonic()))
        except KeyboardInterrupt:
            pass
    print(f"{answered} calls answered, {failed} failed")


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 50.0,
        sys.argv[2] if len(sys.argv) > 2 else "greeter",
    )
