"""A worker that measures one line of a text, for the line master: its
words and its longest word, and which worker did it.

Run: python examples/scatter/worker.py NAME [FOLDER]
"""

import sys
import time

from pylm.parallel import Worker


class LineMeasurer(Worker):
    def measure(self, message):
        number, line = message.decode().split(" ", 1)  # the master put the number first
        time.sleep(0.1)  # the work of one line: meanwhile the other worker takes the next
        words = [word.strip(".,;:!?") for word in line.split()]
        longest = max(words, key=len)
        result = f'{self.name} measured line {number}: {len(words)} words, longest "{longest}"'
        return result.encode()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "worker1"
    if len(sys.argv) > 2:
        worker = LineMeasurer(name, "master", f"ipc://{sys.argv[2]}/workers")
    else:
        worker = LineMeasurer(name, "master")
    try:
        worker.start()
    except KeyboardInterrupt:
        pass
