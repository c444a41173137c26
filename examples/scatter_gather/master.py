"""A master that splits each job into parts (``scatter``) and adds up the
parts' results into one (``gather``): it counts the words of a text, one
line per worker job.

Run: python examples/scatter_gather/master.py [FOLDER]

Without FOLDER it starts with only its name and registers in the registry
(``PYLM_REGISTRY``); with FOLDER it binds ipc:// endpoints in that folder.
"""

import json
import sys
from collections import Counter

from pylm.parallel import Master


class WordCountMaster(Master):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = {}  # client job -> the counts of its lines gathered so far

    def scatter(self, message):
        """A text into one job per line that has words."""
        return [line for line in message.splitlines() if line.strip()]

    def gather(self, message):
        """Add up a line's counts; once the text's last line is in, give the
        client one result: the totals."""
        job = self.gathering.job  # which client job this line belongs to
        counts = self.counts.setdefault(job, Counter())
        counts.update(json.loads(message))
        if self.gathering.last:
            del self.counts[job]
            yield json.dumps(counts.most_common()).encode()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        folder = sys.argv[1]
        master = WordCountMaster("master", f"ipc://{folder}/front", f"ipc://{folder}/workers")
    else:
        master = WordCountMaster("master")
    try:
        master.start()
    except KeyboardInterrupt:
        pass
