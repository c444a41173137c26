"""pylm.window without sockets: the records, room, expiry, a stream's count,
the loop the streaming clients share, and job()'s messages=N."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from pylm.errors import PylmError, RequestTimeout
from pylm.window import JobResult, Outcome, Stop, Window, job_results, values


def timed_out(index: int, together: int) -> PylmError:
    return RequestTimeout(f"job {index}, {together} together")


def test_jobs_are_numbered_in_payload_order_across_messages() -> None:
    window = Window(10, 5.0, timed_out)
    window.add([7, 8], 1.0)
    window.add([9], 2.0)
    assert [(i, job.index, job.deadline, job.sent) for i, job in window.jobs.items()] == [
        (7, 0, 6.0, 1.0),
        (8, 1, 6.0, 1.0),
        (9, 2, 7.0, 2.0),
    ]


def test_expire_takes_out_only_the_jobs_past_their_deadline() -> None:
    window = Window(10, 5.0, timed_out)
    window.add([1, 2], 0.0)
    window.add([3], 1.0)
    outcomes = window.expire(5.0)
    assert [(index, value, str(error), over) for index, value, error, over in outcomes] == [
        (0, None, "job 0, 2 together", True),
        (1, None, "job 1, 2 together", True),
    ]
    assert list(window.jobs) == [3]


@pytest.mark.parametrize("order", [["end", "item", "item"], ["item", "end", "item"]])
def test_a_stream_ends_once_its_end_and_every_item_are_in(order: list[str]) -> None:
    window = Window(10, 5.0, timed_out)
    window.add([1], 0.0)
    for step, kind in enumerate(order):
        assert 1 in window.jobs, step
        window.tally(1, window.jobs[1], 2 if kind == "end" else None)
    assert 1 not in window.jobs


def test_a_stream_lives_while_it_flows() -> None:
    window = Window(10, 5.0, timed_out)
    window.add([1, 2], 0.0)
    window.tally(1, window.jobs[1], None)
    assert list(window.jobs) == [2, 1]  # the oldest deadline first
    assert window.jobs[1].deadline > 5.0
    assert window.jobs[1].sent == 0.0


def run(size: int, payloads: int, answer: bool) -> tuple[list[Outcome], list[int], list[bool]]:
    """A window's run with a sender of ``payloads`` jobs and a reader that
    answers the oldest job out each turn (or none); what came out, the jobs
    out at each turn, and whether the run said it finished."""
    window = Window(size, 0.05, timed_out)
    sent = iter(range(payloads))
    out: list[int] = []
    finished: list[bool] = []

    def send(room: int, until: float) -> Stop:
        out.append(len(window.jobs))
        for _ in range(room):
            msg_id = next(sent, None)
            if msg_id is None:
                return Stop.DONE
            window.add([msg_id], 0.0 if not answer else 1e12)
        return Stop.FULL

    def wait(ms: int) -> list[Outcome]:
        out.append(len(window.jobs))
        if not answer or not window.jobs:
            return []
        _, job = window.jobs.popitem(last=False)  # one answer a turn
        return [(job.index, b"ok", None, True)]

    outcomes = list(window.run(send, wait, lambda: finished.append(True)))
    return outcomes, out, finished


def test_the_loop_keeps_at_most_size_jobs_out_and_ends_when_all_are_answered() -> None:
    outcomes, out, finished = run(3, 10, answer=True)
    assert sorted(index for index, *_ in outcomes) == list(range(10))
    assert max(out) <= 3
    assert finished == [True]


def test_the_loop_ends_jobs_without_an_answer_by_their_deadline() -> None:
    outcomes, _, finished = run(4, 6, answer=False)
    assert sorted(index for index, *_ in outcomes) == list(range(6))
    assert all(isinstance(error, RequestTimeout) for _, _, error, _ in outcomes)
    assert finished == [True]


def outcomes_of(*outcomes: Outcome) -> Generator[Outcome, None, None]:
    yield from outcomes


def test_values_stop_after_messages_and_raise_a_jobs_error() -> None:
    three = [(0, b"a", None, False), (0, None, None, True), (1, b"b", None, True)]
    assert list(values(lambda: outcomes_of(*three), None)) == [b"a", b"b"]
    assert list(values(lambda: outcomes_of(*three), 1)) == [b"a"]
    started: list[bool] = []
    assert list(values(lambda: started.append(True) or outcomes_of(), 0)) == []
    assert started == []  # messages=0: no job goes out
    failed = (2, None, PylmError("boom"), True)
    with pytest.raises(PylmError, match="boom"):
        list(values(lambda: outcomes_of(failed), None))
    with pytest.raises(ValueError, match="messages"):
        list(values(lambda: outcomes_of(), -1))


def test_job_results_give_results_items_and_failures_not_ends() -> None:
    error = PylmError("boom")
    outcomes = [(0, b"a", None, False), (0, None, None, True), (1, None, error, True)]
    assert list(job_results(lambda: outcomes_of(*outcomes))) == [
        JobResult(0, b"a", None),
        JobResult(1, None, error),
    ]
