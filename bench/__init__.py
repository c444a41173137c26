"""Benchmarks of pylm against raw pyzmq and other Python RPC frameworks.

Run ``python -m bench.rpc --help`` (RPC round trips) or
``python -m bench.pipeline --help`` (throughput of a 3-stage pipeline) from
the repository root. The peers (zerorpc, Pyro5, msgpack) come with the
``bench`` extra: ``pip install -e .[bench]``.
"""
