"""Reads two sensors through the watching master and prints what its gather
made of their readings.

Run: python examples/gather/client.py [FOLDER]
"""

import sys
import time

from pylm.parallel import Client

if __name__ == "__main__":
    if len(sys.argv) > 1:
        client = Client(f"ipc://{sys.argv[1]}/front", "master", timeout=10)
    else:
        client = Client("master", timeout=10, wait=10)  # by name; it may be starting
    with client:
        # The fridge never goes over the threshold: gather gives exactly one
        # output in all, its summary, and eval() returns it.
        print("Client got: ", client.eval("readings", b"fridge"))
        # The boiler does, twice: an alert each time, then the summary; a stream.
        began = time.monotonic()
        items = 0
        for item in client.stream("readings", b"boiler"):
            items += 1
            print("Client got: ", item, f"after {time.monotonic() - began:.1f} s", flush=True)
        print(f"The boiler's stream ended after {items} items")
