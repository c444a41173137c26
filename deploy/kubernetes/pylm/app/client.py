"""Sends N jobs through the pipeline and checks each result:
python client.py [N] (1000 by default). Prints one line, or fails."""

import sys

from pylm.chained import LoopClient

count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
payloads = [b"job %d" % i for i in range(count)]
expected = sorted(b"done: " + p.upper()[::-1] for p in payloads)
with LoopClient("upper", timeout=30, announce=False) as client:
    results = sorted(client.job("upper", payloads))
if results != expected:
    sys.exit(f"{len(results)} results, {len(set(results) & set(expected))} right, of {count}")
print(f"{count} jobs, {count} right results")
