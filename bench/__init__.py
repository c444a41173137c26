"""Benchmarks of pylm against raw pyzmq and other Python RPC frameworks.

Run ``python -m bench.rpc --help`` from the repository root. The peers
(zerorpc, Pyro5, msgpack) come with the ``bench`` extra: ``pip install -e .[bench]``.
"""
