"""A worker that counts the words of one line, for the word-count master.

Run: python examples/scatter_gather/worker.py NAME [FOLDER]
"""

import json
import sys
from collections import Counter

from pylm.parallel import Worker


class WordCounter(Worker):
    def count_words(self, message):
        words = (word.strip(".,;:!?").lower() for word in message.decode().split())
        return json.dumps(Counter(words)).encode()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "worker1"
    if len(sys.argv) > 2:
        worker = WordCounter(name, "master", f"ipc://{sys.argv[2]}/workers")
    else:
        worker = WordCounter(name, "master")
    try:
        worker.start()
    except KeyboardInterrupt:
        pass
