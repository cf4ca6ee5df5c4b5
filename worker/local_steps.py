"""Local steps: a worker process runs the steps its own sweeper shards claim, with no broker
message per step, no thread asleep while a poll waits for its slot, and its Redis work in
batches.

A poll used to travel sweeper -> broker (an enqueue) -> a consumer's fetch -> an actor thread
-> an ack, then cost two more round trips of its own (its start, its outcome) and held its
thread asleep until its slot (about 120 ms at 2 x 32 threads): 1.6-2.1 ms of worker CPU per
API call, and threads, not the keys' budgets, bounded the rate (issue 14, docs/benchmarks.md).
Here, in the process whose sweeper claimed them:

1. **start**: the tracks a pass hands over are started together: every one's ``poll_start.lua``
   (own the step, read the record, book the GET's slot) in one round trip
   (``PollStarter.start_many``);
2. **wait**: each poll sits on a timer, not a thread, until just before its slot;
3. **send**: a thread makes the GET (``worker.steps.track.answer_poll``; the call's own gate
   still sleeps to the slot and checks it is not late);
4. **write**: the outcomes of the polls answered within ``WRITE_EVERY`` are written together,
   one round trip (``PaymentStore.write_many``), and what follows each (metrics, logs, the
   completion model) runs after its write.

Creates stay on the broker: few, and their at-most-once mark wants one thread from the slot
to the send, which sleeps there (run here, a burst of creates held every thread asleep, the
process fell behind and its polls spilled onto the broker, where each met a far slot).

Durability is the store's, as it was the message's: a claimed step is in flight with a lease,
and claim.lua makes the claiming process its owner (``claim_due_many(claimer=...)``), so if
this process dies the sweeper puts its steps back as due within ``PAYPOLL_DEAD_AFTER``,
queued, waiting or answered and not yet written alike (a GET changes nothing: it is made
again). A process that stops puts what it has not sent back as due at once (``put_back.lua``)
and writes what it has answered.

Room: at most ``ROOM_PER_THREAD`` steps per thread wait to start; a process whose oldest one
has waited ``BEHIND_AFTER`` (2 s) is behind, and the passes send their steps on the broker,
for any process of the fleet, until it catches up: a fleet with more processes than sweeper
shards, or a shard busier than its leader can serve, still spreads its work.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import structlog

from worker import metrics
from worker.errors import PaypollError
from worker.poll_start import PollStart
from worker.runtime import Runtime
from worker.steps import run_track
from worker.steps.outcomes import REDIS_RETRY_FOR
from worker.steps.track import Outcome, Poll, answer_poll, begin_poll, slot_for
from worker.store import Transition

log = structlog.get_logger("paypoll.local_steps")
T = TypeVar("T")

#: (step, account, reference_id), as the sweeper claims them
Step = tuple[str, str, str]
STOP_TIMEOUT = 10.0  # seconds stop() waits for the running steps (each has its own timeouts)
# Seconds before its slot that a poll is handed to a thread: the hand-over and the request's
# preparation fit in it, and the call's own gate sleeps the rest, so the send's time is the
# sleep's, not the hand-over's (a 0.5 ms lead saved a sleep per call but drew five 429s in nine
# benchmark runs, none in three at 4 ms: docs/benchmarks.md).
SLOT_LEAD = 0.004
# Steps that may wait to start, per thread: more than a pass claims for a process's share of
# many keys (the in-flight budgets bound them anyway; waiting to start holds no slot).
ROOM_PER_THREAD = 128
# A process whose oldest step has waited this long to start is behind: the next passes send
# their steps on the broker, for the rest of the fleet, until it catches up. Long enough that a
# pause (a profiler's samples, a host's stolen CPU, a GC) does not spill polls: on the broker
# each books a slot the local ones already hold and comes back as a far slot (0.25 s here
# turned a profiled run's 10 far slots into 629).
BEHIND_AFTER = 2.0  # seconds
# Most polls started in one round trip: a batch is on the timer within a few ms of its
# booking, so its first slots are not missed.
START_BATCH = 32
# Seconds the outcomes of answered polls gather before one round trip writes them all: a
# payment's outcome is stored at most this much later, for a write per batch, not per poll.
WRITE_EVERY = 0.05
WRITE_BATCH = 256  # most outcomes written in one round trip (a fuller batch goes at once)


@dataclass
class _Work:
    """A step on its way through the stages."""

    step: str
    account: str
    reference_id: str
    offered: float  # time.perf_counter() when offered: the job's duration starts here
    queued_at: float  # time.perf_counter() when it last joined a queue
    poll: Poll | None = None  # once started
    outcome: Outcome | None = None  # once answered
    # Its own context: the log context its stages bind lives here, so no stage clears and
    # binds it again on whichever thread runs it (one stage at a time enters it).
    context: contextvars.Context = field(default_factory=contextvars.Context)
    bound: bool = False  # whether its first stage has bound the log context yet


class LocalSteps:
    """``threads`` threads and a timer running the steps :meth:`offer` accepts, and a writer
    storing their outcomes (module docstring). ``actor_names`` maps a step to the actor name
    its job metrics carry (the same series as the broker's jobs)."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        threads: int,
        actor_names: dict[str, str],
        write_every: float = WRITE_EVERY,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if not runtime.identity:
            raise ValueError("local steps need a worker process identity (Runtime.identity)")
        self.rt = runtime
        self.owner = runtime.identity
        self._actor_names = actor_names
        self._write_every = write_every
        self._room = ROOM_PER_THREAD * threads
        self._lock = threading.Lock()
        self._work_cv = threading.Condition(self._lock)  # something for a thread, or stopping
        self._timer_cv = threading.Condition(self._lock)  # a sooner timer, or stopping
        self._writer_cv = threading.Condition(self._lock)  # an outcome to write, or stopping
        self._due: deque[_Work] = deque()  # polls at their slot: before anything else
        self._tracks: deque[_Work] = deque()  # to start
        self._timers: list[tuple[float, int, _Work]] = []  # (time.monotonic() due, seq, work)
        self._answered: list[_Work] = []  # to write
        self._seq = itertools.count()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"paypoll-local-{i}", daemon=True)
            for i in range(threads)
        ]
        self._timer = threading.Thread(target=self._tick, name="paypoll-local-timer", daemon=True)
        self._writer = threading.Thread(
            target=self._write_loop, name="paypoll-local-writer", daemon=True
        )

    def start(self) -> None:
        """Start the threads, the timer and the writer."""
        for thread in [*self._threads, self._timer, self._writer]:
            thread.start()

    def offer(self, steps: Sequence[Step]) -> list[Step]:
        """Take as many of the tracks of ``steps`` as there is room for, in order; the rest
        (and every create), in order, to send on the broker. Everything is returned once the
        process is stopping."""
        now = time.perf_counter()
        rest: list[Step] = []
        with self._lock:
            if self._stopping:
                return list(steps)
            behind = bool(self._tracks) and now - self._tracks[0].queued_at > BEHIND_AFTER
            room = 0 if behind else self._room - len(self._tracks)
            taken = 0
            for step in steps:
                if step[0] == "track" and taken < room:
                    self._tracks.append(_Work(*step, offered=now, queued_at=now))
                    taken += 1
                else:
                    rest.append(step)
            self._work_cv.notify(taken)
        return rest

    def waiting(self) -> dict[str, int]:
        """How many steps are at each stage: to start, waiting for their slot, at their slot,
        answered and not written yet."""
        with self._lock:
            return {
                "to_start": len(self._tracks),
                "at_timer": len(self._timers),
                "due": len(self._due),
                "to_write": len(self._answered),
            }

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Take no more steps, put the ones not sent yet back as due, let the running ones
        finish and write every answered outcome (up to ``timeout`` seconds in all); the number
        put back."""
        with self._lock:
            self._stopping = True
            left = [*self._tracks, *self._due, *(work for _, _, work in self._timers)]
            for queue in (self._tracks, self._due):
                queue.clear()
            self._timers.clear()
            for cv in (self._work_cv, self._timer_cv, self._writer_cv):
                cv.notify_all()
        back = self._put_back(left)
        deadline = time.monotonic() + timeout
        for thread in [*self._threads, self._timer]:
            if thread.ident is not None:  # started
                thread.join(max(0.0, deadline - time.monotonic()))
        # The writer goes last: the threads' last outcomes reach it before it ends.
        with self._lock:
            self._writer_cv.notify_all()
        if self._writer.ident is not None:
            self._writer.join(max(0.0, deadline - time.monotonic()))
        return back

    # --- the stages -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not (self._due or self._tracks or self._stopping):
                    self._work_cv.wait()
                if self._due:
                    batch = [self._due.popleft()]
                elif self._tracks:
                    batch = [
                        self._tracks.popleft() for _ in range(min(START_BATCH, len(self._tracks)))
                    ]
                else:
                    return
            if batch[0].poll is not None:
                self._send(batch[0])
            else:
                self._start(batch)

    def _start(self, batch: list[_Work]) -> None:
        """Start ``batch``'s polls in one round trip and set each on the timer."""
        rt = self.rt
        accounts = rt.settings.accounts
        known = [w for w in batch if w.account in accounts]
        for work in batch:
            if work.account not in accounts:
                self._run_whole(work)  # no rate known here: the step's own path reports it
        for work in known:
            metrics.job_started(self._actor_names[work.step])
        try:
            starts = rt.polls.start_many(
                [(w.account, w.reference_id, accounts[w.account].rate) for w in known],
                owner=self.owner,
                lease=rt.settings.sweep_grace,
                max_wait=rt.settings.max_wait,
            )
        except redis.RedisError as exc:
            # Unknown which ran: each one's own step path sorts it out (a start is idempotent).
            log.warning("local_steps.start_failed", polls=len(known), error=type(exc).__name__)
            for work in known:
                self._run_whole(work, counted=True)
            return
        for work, started in zip(known, starts, strict=True):
            poll = self._in_context(work, self._begin, work, started)
            if poll is not None:
                self._set_timer(work, poll)

    def _begin(self, work: _Work, started: PollStart | Exception) -> Poll | None:
        """The poll ``started`` began for ``work``, or None when it ended there (logged)."""
        try:
            if isinstance(started, Exception):
                raise started
            poll = begin_poll(
                self.rt,
                work.account,
                work.reference_id,
                started.record,
                slot_for(started.record, started.slot),
            )
        except Exception as exc:
            self._failed(work, exc)
            return None
        if isinstance(poll, str):
            self._ended(work, poll)
            return None
        work.poll = poll
        return poll

    def _set_timer(self, work: _Work, poll: Poll) -> None:
        after = 0.0 if poll.hold is None else self.rt.limiter.until(poll.hold) - SLOT_LEAD
        with self._lock:
            if not self._stopping:
                due = time.monotonic() + after
                if not self._timers or due < self._timers[0][0]:
                    self._timer_cv.notify()
                heapq.heappush(self._timers, (due, next(self._seq), work))
                return
        # stop() has emptied the stages already: this one goes back by itself.
        self._put_back([work])

    def _tick(self) -> None:
        """Move each poll to the threads when its slot is near."""
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                due = 0
                while self._timers and self._timers[0][0] <= now:
                    self._due.append(heapq.heappop(self._timers)[2])
                    due += 1
                if due:
                    self._work_cv.notify(due)
                self._timer_cv.wait(self._timers[0][0] - now if self._timers else None)

    def _send(self, work: _Work) -> None:
        """The GET of a poll at its slot; its outcome goes to the writer."""
        if not self._in_context(work, self._answer, work):
            return
        with self._lock:
            self._answered.append(work)
            if len(self._answered) == 1 or len(self._answered) >= WRITE_BATCH:
                self._writer_cv.notify()

    def _answer(self, work: _Work) -> bool:
        """``work``'s GET and the outcome it leaves; False when it failed (logged)."""
        assert work.poll is not None
        try:
            work.outcome = answer_poll(self.rt, work.poll)
        except Exception as exc:
            self._failed(work, exc)
            return False
        return True

    def _write_loop(self) -> None:
        """Write the answered outcomes, a batch every ``write_every`` seconds."""
        while True:
            with self._lock:
                while not self._answered and not self._stopping:
                    self._writer_cv.wait()
                if not self._answered:
                    if all(not t.is_alive() for t in self._threads):
                        return
                    self._writer_cv.wait(self._write_every)
                    continue
                if not self._stopping and len(self._answered) < WRITE_BATCH:
                    # Let the batch gather (a full one, or stop(), cuts the wait short).
                    self._writer_cv.wait(self._write_every)
                batch, self._answered = self._answered[:WRITE_BATCH], self._answered[WRITE_BATCH:]
            self._write(batch)

    def _write(self, batch: list[_Work]) -> None:
        """Write ``batch``'s outcomes in one round trip, retrying while Redis is away (as
        ``persist`` does for one), then run what follows each."""
        writes = [w.outcome.write for w in batch if w.outcome is not None]
        deadline = time.monotonic() + REDIS_RETRY_FOR
        delay = 0.1
        while True:
            try:
                answers = self.rt.store.write_many(writes)
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    # Not written: the steps stay in flight and are polled again once their
                    # lease runs out (a GET changes nothing).
                    for work in batch:
                        self._in_context(work, self._failed, work, exc)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        for work, answer in zip(batch, answers, strict=True):
            self._in_context(work, self._written, work, answer)

    def _written(self, work: _Work, answer: Transition | Exception) -> None:
        """What follows ``work``'s outcome once written (metrics, logs, learning)."""
        assert work.outcome is not None
        try:
            if isinstance(answer, Exception):
                raise answer
            self._after(work.outcome, answer)
        except Exception as exc:
            self._failed(work, exc)
        else:
            self._ended(work, work.outcome.label)

    @staticmethod
    def _after(outcome: Outcome, moved: Transition) -> None:
        if outcome.after is not None:
            outcome.after(moved)

    # --- helpers --------------------------------------------------------------------------------

    def _run_whole(self, work: _Work, *, counted: bool = False) -> None:
        """Run a track start to end on this thread, as the broker's actor would (the GET
        books and waits for its own slot here)."""
        if not counted:
            metrics.job_started(self._actor_names[work.step])
        self._in_context(work, self._track_here, work)

    def _track_here(self, work: _Work) -> None:
        try:
            outcome = run_track(self.rt, work.account, work.reference_id)
        except Exception as exc:
            self._failed(work, exc)
        else:
            self._ended(work, outcome)

    def _in_context(self, work: _Work, stage: Callable[..., T], *args: Any) -> T:
        """Run ``stage(*args)`` in ``work``'s context, its log context bound at the first."""
        if not work.bound:
            work.bound = True
            work.context.run(
                structlog.contextvars.bind_contextvars,
                actor=self._actor_names[work.step],
                local=True,
                account=work.account,
                reference_id=work.reference_id,
            )
        return work.context.run(stage, *args)

    def _failed(self, work: _Work, exc: BaseException) -> None:
        """A step that raised is logged and left in flight: the sweeper dispatches it again
        when its lease runs out, as it would a failed message's step."""
        if isinstance(exc, PaypollError | redis.RedisError):
            log.warning("local_steps.step_failed", step=work.step, error=type(exc).__name__)
        else:
            log.error("local_steps.step_failed", step=work.step, exc_info=(type(exc), exc, None))
        self._ended(work, "error")

    def _ended(self, work: _Work, outcome: str) -> None:
        metrics.job_ended(self._actor_names[work.step], outcome, time.perf_counter() - work.offered)

    def _put_back(self, works: list[_Work]) -> int:
        """Return steps claimed and not sent to the store as due now; the number put back."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for work in works:
            grouped.setdefault((work.account, work.step), []).append(work.reference_id)
            if work.poll is not None:  # its start counted it as in progress
                self._ended(work, "put_back")
        back = 0
        for (account, step), references in grouped.items():
            try:
                back += self.rt.store.put_back(account, step, references, owner=self.owner)
            except redis.RedisError as exc:
                # They stay in flight, owned by this process: the sweeper recovers them once
                # its heartbeat is gone, or their lease runs out.
                log.warning("local_steps.put_back_failed", account=account, error=str(exc))
        if works:
            log.info("local_steps.put_back", steps=len(works), put_back=back)
        return back
