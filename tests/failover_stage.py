"""A pipeline stage in a process of its own, for the tests that kill or
freeze one. By name (the registry in ``PYLM_REGISTRY`` and ``PYLM_CLUSTER``)::

    python tests/failover_stage.py step NAME NEXT_CALL
    python tests/failover_stage.py last NAME

By address (no registry; ports from the OS): ``step NAME NEXT_CALL
NEXT_ADDRESS[,NEXT_ADDRESS...]`` or ``last NAME``, with ``--address``. Either
way the process prints its bound addresses on one line once it serves
(``pull db`` for a step, ``pull db push`` for a last stage), then serves until
it is signalled. ``--ttl N``: a lease of N seconds (1 by default), for a
test in which the registry must go on listing a killed instance."""

from __future__ import annotations

import signal
import sys

from servers import Last, Step

ANY = "tcp://127.0.0.1:0"


def main(argv: list[str]) -> None:
    by_address = "--address" in argv
    args = [arg for arg in argv if arg != "--address"]
    ttl = 1
    if "--ttl" in args:
        at = args.index("--ttl")
        ttl = int(args[at + 1])
        del args[at : at + 2]
    role, name = args[0], args[1]
    if role == "last":
        last = Last(name, ANY, ANY, ANY, log_stdout=False) if by_address else None
        server = last if last is not None else Last(name, ttl=ttl, log_stdout=False)
    elif by_address:
        server = Step(name, ANY, args[3].split(","), args[2], ANY, log_stdout=False)
    else:
        server = Step(name, next_call=args[2], ttl=ttl, log_stdout=False)
    server.start(background=True)
    bound = [server.address, server.db] + ([server.push] if role == "last" else [])
    print(" ".join(str(address) for address in bound), flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
