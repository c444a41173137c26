"""What pylm counts and how it is seen from outside.

* :mod:`~pylm.telemetry.counting`: the plain counters servers and clients write.
* :mod:`~pylm.telemetry.exposition`: the Prometheus collector that reads them
  (every ``pylm_`` family is named there).
* :mod:`~pylm.telemetry.httpd`: the bounded HTTP service every endpoint uses.
* :mod:`~pylm.telemetry.exporter`: a process's ``/metrics`` endpoint.
* :mod:`~pylm.telemetry.sd`: ``pylm sd``, Prometheus' service discovery from the registry.
* :mod:`~pylm.telemetry.prometheus`: a local Prometheus for tests and demos.
* :mod:`~pylm.telemetry.top`: ``pylm top``, a terminal view of the endpoints.

Nothing here imports a server or client module: servers and clients import
telemetry, never the other way round (tests/test_imports.py).
"""
