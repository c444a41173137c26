"""Second stage: bar, then on to last.baz."""

from endpoints import endpoint

from pylm.chained import Server


class MyServer(Server):
    def bar(self, message):
        return b"got it too, after " + message


if __name__ == "__main__":
    server = MyServer(
        "step2", endpoint("step2_pull"), endpoint("last_pull"), "last.baz", endpoint("step2_db")
    )
    try:
        server.start()
    except KeyboardInterrupt:
        pass
