"""First stage: foo, then on to step2.bar."""

from endpoints import endpoint

from pylm.chained import Server


class MyServer(Server):
    def foo(self, message):
        return b"you sent me " + message


if __name__ == "__main__":
    server = MyServer(
        "step1", endpoint("step1_pull"), endpoint("step2_pull"), "step2.bar", endpoint("step1_db")
    )
    try:
        server.start()
    except KeyboardInterrupt:
        pass
