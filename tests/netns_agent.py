"""The agent of a test host (see netns.py): runs inside a network namespace.

Reads one JSON request per line, ``{"call": "function", "args": [...]}``,
calls that function of the module named on the command line and writes
``{"value": result}`` or ``{"error": traceback}`` as one line. When its
input ends, it calls the module's ``stop_all()`` and exits.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the called code prints goes to the log, not the replies
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                reply = {"value": getattr(module, request["call"])(*request["args"])}
                text = json.dumps(reply)
            except BaseException:
                text = json.dumps({"error": traceback.format_exc()})
            replies.write(text + "\n")
            replies.flush()
    finally:
        module.stop_all()


if __name__ == "__main__":
    main()
