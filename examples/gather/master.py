"""A master that defines ``gather`` alone: each job is a part of itself, and
every item its worker streams goes through ``gather``, which sends on zero or
more outputs for it. Here it watches a sensor's readings: an alert when one
goes over a threshold, and a summary once the last reading is in.

Run: python examples/gather/master.py [FOLDER]

Without FOLDER it starts with only its name and registers in the registry
(``PYLM_REGISTRY``); with FOLDER it binds ipc:// endpoints in that folder.
"""

import sys

from pylm.parallel import Master

THRESHOLD = 90.0  # an alert when a reading goes over this, from at or below it


class Readings:
    """What gather keeps of one client job's readings so far."""

    def __init__(self):
        self.count = 0
        self.total = 0.0
        self.high = float("-inf")
        self.over = False  # whether the latest reading was over the threshold


class WatchMaster(Master):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Client job -> its Readings so far. A job that fails never has a last
        # reading, and its entry stays: a few numbers, small enough here.
        self.readings = {}

    def gather(self, message):
        """One reading, ``b"SENSOR VALUE"``, into zero or more outputs: an
        alert if it goes over the threshold, and, after the job's last
        reading, a summary. The master holds each reading back until the
        next one comes (so that ``self.gathering.last`` is known): an alert
        goes out one reading late."""
        job = self.gathering.job  # which client job this reading belongs to
        state = self.readings.setdefault(job, Readings())
        sensor, text = message.decode().split()
        value = float(text)
        state.count += 1
        state.total += value
        state.high = max(state.high, value)
        if value > THRESHOLD and not state.over:
            alert = f"alert: {sensor} reading {state.count} is {value:.1f}, over {THRESHOLD:g}"
            yield alert.encode()
        state.over = value > THRESHOLD
        if self.gathering.last:
            del self.readings[job]
            mean = state.total / state.count
            summary = f"{sensor}: {state.count} readings, mean {mean:.1f}, max {state.high:.1f}"
            yield summary.encode()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        folder = sys.argv[1]
        master = WatchMaster("master", f"ipc://{folder}/front", f"ipc://{folder}/workers")
    else:
        master = WatchMaster("master")
    try:
        master.start()
    except KeyboardInterrupt:
        pass
