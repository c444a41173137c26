"""A pipeline stage in a process of its own, for tests that kill it:
``python tests/chained_stage.py NAME NEXT_CALL``, with the registry in
``PYLM_REGISTRY`` and ``PYLM_CLUSTER``."""

from __future__ import annotations

import sys

from servers import Step

if __name__ == "__main__":
    Step(sys.argv[1], next_call=sys.argv[2], ttl=1, log_stdout=False).start()
