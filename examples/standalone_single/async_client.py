"""Calls ``foo`` ten times at once from asyncio and prints the answers.

Run: python examples/standalone_single/async_client.py [ADDRESS]
"""

import asyncio
import sys

from pylm.standalone import AsyncClient


async def main(address):
    async with AsyncClient(address, "my_server") as client:
        messages = [b"message %d" % i for i in range(10)]
        results = await asyncio.gather(*(client.job("foo", m) for m in messages))
    for result in results:
        print("Client got: ", result)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"))
