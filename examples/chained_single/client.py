"""Sends one job through step1 -> step2 -> last and prints the result."""

from endpoints import endpoint

from pylm.chained import LoopClient

if __name__ == "__main__":
    client = LoopClient(
        endpoint("last_push"), endpoint("step1_pull"), endpoint("step1_db"), "step1"
    )
    for result in client.job("foo", [b"a message"]):
        print("Client got: ", result)
