"""Calls ``foo`` on the standalone server and prints the answer.

Run: python examples/standalone_single/client.py [ADDRESS]   (default tcp://127.0.0.1:5555)
"""

import sys

from pylm.standalone import Client

if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
    client = Client(address, "my_server")
    result = client.job("foo", b"a message")
    print("Client got: ", result)
