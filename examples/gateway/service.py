"""A standalone server, started by name, that the gateway puts on HTTP.

Run: python examples/gateway/service.py   (with PYLM_REGISTRY set)
"""

from pylm.standalone import Server


class Words(Server):
    def upper(self, message):
        return message.upper()

    def count(self, message):
        return b"%d" % len(message.split())


if __name__ == "__main__":
    Words("words").start()
