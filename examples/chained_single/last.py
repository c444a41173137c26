"""Last stage: baz, then back to the client that sent the job."""

from endpoints import endpoint

from pylm.chained import LastServer


class MyServer(LastServer):
    def baz(self, message):
        return b"ACK: " + message


if __name__ == "__main__":
    server = MyServer("last", endpoint("last_pull"), endpoint("last_push"), endpoint("last_db"))
    try:
        server.start()
    except KeyboardInterrupt:
        pass
