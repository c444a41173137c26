"""The example pipeline: upper -> reverse -> tag, one Deployment a stage."""

from pylm.chained import LastServer, Server


class Upper(Server):
    def upper(self, message: bytes) -> bytes:
        return message.upper()


class Reverse(Server):
    def reverse(self, message: bytes) -> bytes:
        return message[::-1]


class Tag(LastServer):
    def tag(self, message: bytes) -> bytes:
        return b"done: " + message
