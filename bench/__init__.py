"""Benchmarks of pylm against raw pyzmq and other Python RPC frameworks,
and of pylm's etcd registry.

Run ``python -m bench.rpc --help`` (RPC round trips),
``python -m bench.pipeline --help`` (throughput of a 3-stage pipeline),
``python -m bench.parallel --help`` (a master and its workers: CPU-bound
speedup beside ProcessPoolExecutor, small jobs beside a raw broker) or
``python -m bench.registry --help`` (start-up by name, rewiring and scale of
the registry; needs the ``etcd`` binary on PATH) from the repository root.
The peers (zerorpc, Pyro5, msgpack) come with the ``bench`` extra:
``pip install -e .[bench]``.
"""
