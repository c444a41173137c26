"""A worker whose function streams a sensor's readings, one item each, for
the watching master.

Run: python examples/gather/worker.py NAME [FOLDER]
"""

import sys
import time

from pylm.parallel import Worker

# Recorded temperatures: a streaming function must be deterministic (should
# this worker die mid-stream, the master runs the job again on another one).
SENSORS = {
    "fridge": [4.0, 4.5, 5.0, 4.5, 4.0, 3.0],
    "boiler": [70.0, 78.0, 86.0, 93.0, 97.0, 91.0, 84.0, 88.0, 92.0, 81.0],
}


class SensorReader(Worker):
    def readings(self, message):
        """Yields ``b"SENSOR VALUE"`` per reading of the sensor named."""
        sensor = message.decode()
        for value in SENSORS[sensor]:
            time.sleep(0.05)  # the time to take one reading
            yield f"{sensor} {value:.1f}".encode()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "worker1"
    if len(sys.argv) > 2:
        worker = SensorReader(name, "master", f"ipc://{sys.argv[2]}/workers")
    else:
        worker = SensorReader(name, "master")
    try:
        worker.start()
    except KeyboardInterrupt:
        pass
