"""Runs a streaming job and prints its items as they arrive.

Run: python examples/stream/client.py [FOLDER]
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
        began = time.monotonic()
        items = 0
        for item in client.stream("countdown", b"5"):
            items += 1
            print("Client got: ", item, f"after {time.monotonic() - began:.1f} s", flush=True)
        print(f"The stream ended after {items} items")
