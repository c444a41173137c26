"""The example workers of the master `squares`."""

from pylm.parallel import Worker


class Squarer(Worker):
    def square(self, message: bytes) -> bytes:
        return str(int(message) ** 2).encode()
