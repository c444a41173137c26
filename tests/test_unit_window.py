"""pylm.window without sockets: the records, room, expiry, a stream's count,
the loop the streaming clients share, and job()'s messages=N."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from pylm.errors import PylmError, RequestTimeout
from pylm.window import (
    RETRY_FLOOR,
    Books,
    JobResult,
    Outcome,
    RetryBudget,
    Stop,
    Window,
    job_results,
    values,
)


def timed_out(index: int, together: int, attempts: int) -> PylmError:
    return RequestTimeout(f"job {index}, {together} together, {attempts} attempt(s)")


def add(window: Window, ids: list[int], now: float) -> None:
    window.add(ids, [b"job %d" % msg_id for msg_id in ids], now)


def test_jobs_are_numbered_in_payload_order_across_messages() -> None:
    window = Window(10, 5.0, timed_out)
    add(window, [7, 8], 1.0)
    add(window, [9], 2.0)
    assert [(i, job.index, job.deadline, job.sent) for i, job in window.jobs.items()] == [
        (7, 0, 6.0, 1.0),
        (8, 1, 6.0, 1.0),
        (9, 2, 7.0, 2.0),
    ]


def test_expire_takes_out_only_the_jobs_past_their_deadline() -> None:
    window = Window(10, 5.0, timed_out)
    add(window, [1, 2], 0.0)
    add(window, [3], 1.0)
    outcomes = window.expire(5.0)
    assert [(index, value, str(error), over) for index, value, error, over in outcomes] == [
        (0, None, "job 0, 2 together, 1 attempt(s)", True),
        (1, None, "job 1, 2 together, 1 attempt(s)", True),
    ]
    assert list(window.jobs) == [3]


@pytest.mark.parametrize("order", [["end", "item", "item"], ["item", "end", "item"]])
def test_a_stream_ends_once_its_end_and_every_item_are_in(order: list[str]) -> None:
    window = Window(10, 5.0, timed_out)
    add(window, [1], 0.0)
    for step, kind in enumerate(order):
        assert 1 in window.jobs, step
        window.tally(1, window.jobs[1], 2 if kind == "end" else None)
    assert 1 not in window.jobs


def test_a_stream_lives_while_it_flows() -> None:
    window = Window(10, 5.0, timed_out)
    add(window, [1, 2], 0.0)
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
            add(window, [msg_id], 0.0 if not answer else 1e12)
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


def retrying(burst: float = 100) -> Window:
    return Window(100, 10.0, timed_out, Books(RetryBudget(burst, per_second=0)))


def test_a_job_passed_by_later_answers_is_sent_again_after_its_grace() -> None:
    window = retrying()
    add(window, [1, 2], 0.0)
    add(window, [3], 0.001)
    window.answered(window.jobs.pop(3), 0.01, 1)  # a later job answered: the path works
    assert window.retry_at() == RETRY_FLOOR  # the answer took 9 ms: the floor rules
    window.overdue(RETRY_FLOOR / 2)
    assert window.again == []
    window.overdue(RETRY_FLOOR + 0.1)
    assert [msg_id for msg_id, _ in window.again] == [1, 2]
    assert window.again[0][1].body == b"job 1"  # the same message, the same id
    window.resent([1, 2], RETRY_FLOOR + 0.2)
    assert [window.books.attempts(i) for i in (1, 2)] == [2, 2]
    assert window.books.retried == 2
    window.jobs.pop(1)
    assert window.books.unknown(1)  # its second answer: a duplicate, counted
    assert not window.books.unknown(99)  # an answer to a job never sent again: not one
    assert window.books.duplicates == 1


def test_no_job_is_sent_again_before_a_later_one_is_answered() -> None:
    window = retrying()
    add(window, [1, 2], 0.0)
    window.answered(window.jobs.pop(1), 5.0, 1)  # slow, but in order: nothing is lost
    assert window.retry_at() > 5.0 + RETRY_FLOOR  # 4 x the 5 s an answer takes
    window.overdue(6.0)
    assert window.again == []


def test_a_job_sent_again_and_lost_again_is_sent_once_more_after_another_grace() -> None:
    window = retrying()
    add(window, [1], 0.0)
    add(window, [2], 0.1)
    window.answered(window.jobs.pop(2), 0.11, 1)
    window.overdue(1.0)
    window.resent([msg_id for msg_id, _ in window.again], 1.0)
    window.again.clear()
    assert window.retry_at() == 1.0 + RETRY_FLOOR  # answered later than its first sending
    window.overdue(1.0 + RETRY_FLOOR + 0.01)
    assert [msg_id for msg_id, _ in window.again] == [1]


def test_a_full_pipeline_that_answers_nothing_later_gets_no_copies() -> None:
    window = retrying()
    add(window, [1], 0.0)
    add(window, [2, 3], 0.1)
    window.answered(window.jobs.pop(1), 0.11, 1)  # then nothing: full, or frozen
    window.overdue(60.0)
    assert window.again == []


def test_a_stream_that_began_is_never_sent_again() -> None:
    window = retrying()
    add(window, [1, 2], 0.0)
    add(window, [3], 0.001)
    window.tally(1, window.jobs[1], None)  # an item of job 1
    window.answered(window.jobs.pop(3), 0.01, 1)
    window.overdue(5.0)
    assert [msg_id for msg_id, _ in window.again] == [2]


def test_the_budget_refuses_retries_beyond_its_tokens_and_the_job_expires_named() -> None:
    window = retrying(burst=1)
    add(window, [1, 2], 0.0)
    add(window, [3], 0.001)
    window.answered(window.jobs.pop(3), 0.01, 0)
    window.overdue(1.0)
    assert [msg_id for msg_id, _ in window.again] == [1]
    assert window.books.refused == 1  # job 2 waits: no token
    window.resent([1], 1.0)
    outcomes = window.expire(10.5)
    assert sorted(str(error) for _, _, error, _ in outcomes) == [
        "job 0, 2 together, 2 attempt(s)",
        "job 1, 2 together, 1 attempt(s)",
    ]


def test_the_budget_earns_a_tenth_of_a_token_per_answer_and_some_per_second() -> None:
    budget = RetryBudget(5, ratio=0.1, per_second=2.0)
    budget.tokens, budget._at = 0.0, 0.0
    assert not budget.spend(0.25)  # half a token
    assert budget.spend(0.5)  # one
    budget.earn(10)
    assert budget.spend(0.5)
    budget.earn(1000)
    assert budget.tokens == 5  # at most the burst
