"""A standalone server with one function, ``foo``.

Run: python examples/standalone_single/server.py [ADDRESS]   (default tcp://127.0.0.1:5555)
"""

import sys

from pylm.standalone import Server


class MyServer(Server):
    def foo(self, message):
        self.logger.warning("Got a message")
        return b"you sent me " + message


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
    server = MyServer("my_server", address)
    server.start()  # serves until Ctrl-C
