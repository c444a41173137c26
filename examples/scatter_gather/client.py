"""Sends a text to the word-count master, as one job, and prints the counts.

Run: python examples/scatter_gather/client.py [FOLDER]
"""

import json
import sys

from pylm.parallel import Client

TEXT = b"""The master splits the text,
one job per line.
The workers count the words,
and the master adds the counts.
"""

if __name__ == "__main__":
    if len(sys.argv) > 1:
        client = Client(f"ipc://{sys.argv[1]}/front", "master", timeout=10)
    else:
        client = Client("master", timeout=10, wait=10)  # by name; it may be starting
    with client:
        # One job for the client; the master runs one per line on its workers.
        counts = json.loads(client.eval("count_words", TEXT))
    lines = len(TEXT.splitlines())
    print(f"Counted {sum(n for _, n in counts)} words in {lines} lines; more than once:")
    for word, number in counts:
        if number > 1:
            print(f"  {word}: {number}")
