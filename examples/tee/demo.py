"""Tee: a stage's results go on down the pipeline, and a copy of each to a
side branch that nobody answers (here an audit log).

    client --> orders.price --> receipt.issue --> the client
                    |
                    +-- tee: a copy --> audit.check --> log.keep (a Sink that keeps the copies)

Only the ``next_call`` line answers the client. The copies carry no route:
the side stages run them and pass them on, and the Sink at the end keeps
what it is given. An error in the side branch is logged by the stage where it
happened; the client never hears of it.

    python examples/tee/demo.py    # every server in this process, ipc:// endpoints

The copies travel on their own: the demo waits for them on an Event the
audit log sets once it has them all (10 s at most), not for a fixed time.
"""

import shutil
import tempfile
import threading

from pylm.chained import LastServer, LoopClient, Server, Sink

PRICES = {b"apples": 0.5, b"pears": 0.75, b"truffles": 120.0}
ORDERS = [b"apples 3", b"pears 2", b"truffles 1", b"apples 10", b"pears 4"]


class Orders(Server):
    def price(self, message):
        item, quantity = message.split()
        total = PRICES[item] * int(quantity)
        return b"%s %s: %.2f" % (quantity, item, total)


class Receipt(LastServer):
    def issue(self, message):
        return b"receipt for " + message


class Audit(Server):
    """The side stage: checks each copy and passes it on to the log."""

    def check(self, message):
        total = float(message.rsplit(b": ", 1)[1])
        if total > 100:
            raise ValueError(f"{message.decode()} is over the audit limit")
        return b"audited " + message


class AuditLog(Sink):
    """The side branch's end: keeps the copies; ``complete`` is set once it
    has ``expected`` of them."""

    def __init__(self, *args, expected, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.kept = []
        self.lock = threading.Lock()
        self.complete = threading.Event()

    def keep(self, message):
        with self.lock:
            self.kept.append(message)
            if len(self.kept) >= self.expected:
                self.complete.set()
        return message  # nobody waits for it: it stays here


def main():
    folder = tempfile.mkdtemp(prefix="pylm-tee-")

    def at(name):
        return f"ipc://{folder}/{name}"

    # Every order but the truffles passes the audit: that many copies reach the log.
    log = AuditLog("log", at("log"), at("log_push"), at("log_db"), expected=len(ORDERS) - 1)
    servers = [
        log,
        Audit("audit", at("audit"), at("log"), "log.keep", at("audit_db")),
        Receipt("receipt", at("receipt"), at("receipt_push"), at("receipt_db")),
        Orders(
            "orders",
            at("orders"),
            at("receipt"),
            "receipt.issue",
            at("orders_db"),
            tee={"audit.check": at("audit")},  # tee call -> its stage's address
        ),
    ]
    started = []
    try:
        for server in servers:
            server.start(background=True)
            started.append(server)
        with LoopClient(at("receipt_push"), at("orders"), at("orders_db"), "orders") as client:
            results = list(client.results("price", ORDERS))
        # The copies travel on their own: wait for the audit log to have them all.
        if not log.complete.wait(10):
            raise SystemExit(f"the audit log has {len(log.kept)} copies, not {log.expected}")
        # (Printed once the side branch is done, so that no log line comes in between.)
        for job in sorted(results, key=lambda job: job.index):  # in the order of ORDERS
            if job.error is not None:
                print(f"Client got an error: {job.error}", flush=True)
            else:
                print("Client got: ", job.value, flush=True)
        with log.lock:
            kept = sorted(log.kept)
        print(f"The audit log kept {len(kept)} copies:", flush=True)
        for copy in kept:
            print(f"  {copy.decode()}", flush=True)
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
