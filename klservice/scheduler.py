"""TokenBudgetScheduler: batches the sequences of all in-flight requests onto one backend, fairly.

Why: one shared reference model only pays off if it beats every job computing its own
reference log-probs. That needs large forward batches (many requests' sequences
together), little padding, GRPO groups kept together so the backend computes their shared
prompt once, and fairness so a job sending a huge rollout cannot starve a small one.

How:

- `score()` splits a request into sequences. Sequences found in the reference cache are
  answered at once; the rest join their job's FIFO. More than ``max_queue`` requests
  waiting is refused with `Overloaded`, carrying a retry hint from the measured drain
  rate; so is a request that would take its tenant past its quota of queued tokens
  (``max_queued_tokens``; other tenants are served as before).
- One worker task forms steps. It waits up to ``max_wait_s`` for work to accumulate,
  then picks sequences by deficit round-robin over *shares* (each visit grants a share a
  quantum of ``max_batch_tokens × weight / total weight`` tokens; the deficit carries over
  while the share has backlog), until ``max_batch_tokens`` are chosen. A share is a tenant
  with authentication (weighted by its auth-file weight), else a job; within a share its
  jobs take turns item by item, so spreading load over more job ids gains nothing.
- Work whose caller has gone (cancelled, or its deadline passed) leaves the queue at once
  and is counted in ``klservice_dropped_total{reason="cancelled"|"deadline"}``; work found
  expired when a step is formed is answered DEADLINE_EXCEEDED unrun.
- A job is held only while it has work queued: an idle job is forgotten, so the table of
  jobs is bounded by the queue (``max_queue`` requests), whatever job ids callers send.
- A step is bounded in time as well as in tokens (``max_step_s``): its token budget is the
  smaller of ``max_batch_tokens`` and the budget tokens per second (padded, or real where the
  backend packs) measured over recent calls × ``max_step_s`` (from the first call measured on), so a request
  of an idle job waits about one bounded step, not one step of the whole budget. A GRPO group (the
  sequences of one request with the same prompt) is chosen whole and run as one call even when it
  alone exceeds a bounded step; only a group beyond ``max_batch_tokens`` is split.
- `plan_calls` packs the chosen sequences into backend calls: sequences with the same
  prompt stay together and are handed to the backend as a group (it computes their prompt
  once), units are sorted by length and packed so that each call's cost stays within the
  budget: the tokens it computes where the backend packs (no padding, a group's prompt once),
  else count × longest.
- The calls run in one worker thread (the event loop never blocks on the model); each call's
  results are scattered back to their requests as soon as that call is done (a request is
  answered when the call holding its last sequence is, not when the whole step is) and
  stored in the cache.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Sequence

import numpy as np

from klservice.backends.base import (
    LOGPROB_SLACK, Interrupted, ReferenceBackend, TeacherAsk, TeacherOutput, group_by_prompt,
)
from klservice.config import ServerConfig
from klservice.errors import DEADLINE_SLACK_S, BackendFault, DeadlineExpired, NotReady, Overloaded, TooLarge
from klservice.validation import Batch

log = logging.getLogger(__name__)

DEFAULT_CALL_PADDING = ServerConfig.call_padding
"""Most padding a backend call carries, as a share of its real tokens, before it is split (`plan_calls`)."""
MAX_DEBTS = 1024
"""Most forgotten shares whose debt (negative deficit) is remembered until they come back."""
MIN_STEP_TOKENS = 64
"""Smallest token budget a time-bounded step gets, whatever the measured throughput."""
STOP_WAIT_S = 30.0
"""On stop, the longest wait for the worker thread's forward to return (hf: it stops within one layer)."""


@dataclasses.dataclass(frozen=True)
class PlannedCall:
    """One backend call: which sequences, and their prompt groups (positions within `indices`)."""

    indices: list[int]
    prompt_groups: list[list[int]]


def packed_tokens(sequences: Sequence[np.ndarray], starts: Sequence[int], unit: Sequence[int]) -> int:
    """Tokens a packing backend computes for `unit` (indices of sequences with one prompt, `group_by_prompt`): a
    group's prompt once, then each member's continuation; a sequence alone, its tokens."""
    if len(unit) == 1:
        return len(sequences[unit[0]])
    start = starts[unit[0]]
    return start + sum(len(sequences[i]) - start for i in unit)


def plan_calls(
    sequences: Sequence[np.ndarray],
    starts: Sequence[int],
    max_batch_tokens: int,
    max_padding: float = DEFAULT_CALL_PADDING,
    packed: bool = False,
    max_unit_tokens: int | None = None,
) -> list[PlannedCall]:
    """The backend calls for `sequences`, each with the prompt groups the backend may share.

    Sequences with identical prompts (`group_by_prompt`) form one unit, kept in one call; units
    are sorted by their longest sequence and packed greedily under max_batch_tokens. A call's
    cost depends on the backend: `packed` (`ReferenceBackend.packs`: no padding, a group's prompt
    computed once) costs the tokens computed (`packed_tokens`); otherwise (sequences in the call)
    × (longest in the call), and a call of at least max_batch_tokens / 8 real tokens is closed
    rather than padded beyond `max_padding` × its real tokens (mixed lengths would otherwise pad
    short sequences to the longest; the floor keeps calls from getting small). A unit that alone
    exceeds the budget is split into budget-sized runs of its own, unless it fits
    `max_unit_tokens` (default: the budget): then it is a call of its own, whole (the scheduler's
    time-bounded steps keep a GRPO group, and so its shared prompt, in one call up to
    --max-batch-tokens).
    """
    max_unit_tokens = max(max_batch_tokens, max_unit_tokens or 0)
    units = sorted(group_by_prompt(sequences, starts), key=lambda unit: max(len(sequences[i]) for i in unit))
    min_call_tokens = max_batch_tokens // 8
    calls: list[list[list[int]]] = []  # per call, its units
    current: list[list[int]] = []
    used = size = longest = real = 0  # the call's cost (packed); padded: its sequences, the longest, real tokens
    for unit in units:
        unit_longest = max(len(sequences[i]) for i in unit)
        unit_real = sum(len(sequences[i]) for i in unit)
        if packed:
            unit_cost = packed_tokens(sequences, starts, unit)
            cost, too_padded = used + unit_cost, False
        else:
            unit_cost = len(unit) * unit_longest
            cost = (size + len(unit)) * max(longest, unit_longest)
            too_padded = real >= min_call_tokens and cost > (1 + max_padding) * (real + unit_real)
        if current and (cost > max_batch_tokens or too_padded):
            calls.append(current)
            current, used, size, longest, real = [], 0, 0, 0, 0
        if max_batch_tokens < unit_cost <= max_unit_tokens:  # whole, alone (the call before it was closed above)
            calls.append([unit])
            continue
        if unit_cost > max_unit_tokens:
            unit = sorted(unit, key=lambda i: len(sequences[i]))
            if packed:  # each run computes the prompt once, then its members' continuations
                start = starts[unit[0]]
                per_call = max(1, (max_unit_tokens - start) // max(1, unit_longest - start))
            else:
                per_call = max(1, max_unit_tokens // unit_longest)
            for begin in range(0, len(unit), per_call):
                calls.append([unit[begin : begin + per_call]])
            continue
        current.append(unit)
        used += unit_cost
        size += len(unit)
        longest = max(longest, unit_longest)
        real += unit_real
    if current:
        calls.append(current)
    planned = []
    for call in calls:
        indices = [i for unit in call for i in unit]
        positions = iter(range(len(indices)))
        planned.append(PlannedCall(indices, [[next(positions) for _ in unit] for unit in call]))
    return planned


@dataclasses.dataclass(eq=False)
class _Request:
    job: str
    share: str
    temperature: float
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future
    results: list
    remaining: int  # sequences without a value yet
    queued: int = 0  # sequences still in the job's queue
    teacher: list | None = None  # per sequence its TeacherOutput, where teacher outputs were asked for

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclasses.dataclass(eq=False)
class _Item:
    """One sequence of a request, waiting for the model."""

    request: _Request
    index: int
    tokens: np.ndarray
    start: int
    cache_key: bytes | None
    ask: TeacherAsk | None = None

    @property
    def cost(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(eq=False)
class _Share:
    """One party of the fair sharing (a tenant with authentication, else a job): its jobs' queues, served
    round-robin item by item, and its deficit in the round-robin between shares."""

    name: str
    weight: float = 1.0
    jobs: dict[str, collections.deque] = dataclasses.field(default_factory=dict)  # in round-robin order
    deficit: float = 0.0
    tokens: int = 0  # queued, for the share's quota

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def head(self) -> "_Item":
        return self.jobs[next(iter(self.jobs))][0]

    def head_group(self, packed: bool = False) -> tuple[int, int, int]:
        """(items, tokens, step tokens) of the GRPO group at the head of the job whose turn it is: the head item and
        those after it of the same request with the same prompt (a lone sequence is a group of one). Step tokens
        are what the group costs in a step's budget: its tokens, or where the backend packs (`packed`), the tokens
        it computes, the prompt once."""
        queue = self.jobs[next(iter(self.jobs))]
        head = queue[0]
        prompt = head.tokens[: head.start]
        members = []
        for item in queue:
            if item.request is not head.request or item.start != head.start or not np.array_equal(item.tokens[: item.start], prompt):
                break
            members.append(item.tokens)
        cost = sum(len(tokens) for tokens in members)
        step_cost = packed_tokens(members, [head.start] * len(members), range(len(members))) if packed else cost
        return len(members), cost, step_cost

    def pop(self, rotate: bool = True) -> "_Item":
        """The next item, from the job whose turn it is; that job goes to the back of the line (`rotate`), or
        keeps its turn."""
        job = next(iter(self.jobs))
        queue = self.jobs[job]
        item = queue.popleft()
        if not queue:
            del self.jobs[job]
        elif rotate:
            del self.jobs[job]
            self.jobs[job] = queue
        self.tokens -= item.cost
        return item

    def items(self):
        return (item for queue in self.jobs.values() for item in queue)


class TokenBudgetScheduler:
    """Fair, token-budget batching of concurrent scoring requests onto one backend."""

    def __init__(
        self,
        backend: ReferenceBackend,
        *,
        max_batch_tokens: int,
        max_queue: int,
        max_wait_s: float = 0.002,
        max_step_s: float = 0.0,
        call_padding: float = DEFAULT_CALL_PADDING,
        cache=None,
        metrics=None,
    ):
        if not max_step_s >= 0:
            raise ValueError(f"--max-step-seconds {max_step_s}: expected a number of seconds >= 0 (0: no bound)")
        self._backend = backend
        self._max_step_s = max_step_s
        self._budget_tokens_per_second = 0.0  # smoothed budget tokens (count × longest, or real if packed) per second
        self._call_padding = call_padding
        self._in_call = threading.Event()  # set while the worker thread is inside the backend's score()
        self._max_batch_tokens = max_batch_tokens
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self._cache = cache
        self._metrics = metrics
        self._shares: dict[str, _Share] = {}  # exactly the shares in the rotation: those with work queued
        self._rotation: collections.deque[_Share] = collections.deque()
        self._waiting_requests = 0
        self._waiting_tokens = 0
        self._tokens_per_second = 0.0  # smoothed drain rate, for retry hints
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="klservice-forward")
        self._worker: asyncio.Task | None = None
        self._running: list[_Item] = []  # the step in the worker thread
        self._joiners: list[_Item] = []  # what joined the running step between its calls
        self._publishes = True  # whether this scheduler sets the queue gauges
        self._debts: collections.OrderedDict[str, float] = collections.OrderedDict()  # forgotten shares' deficits
        self._closing = False

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="klservice-scheduler")

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or running (True), or until `timeout` seconds have passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._waiting_requests or self._running:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Stop now: fail queued and running work with UNAVAILABLE, interrupt a running forward (the backend
        stops it within one step: `ReferenceBackend.interrupt`), release the worker thread."""
        self._closing = True
        running, self._running = self._running, []
        # Interrupt only a backend call in flight: between calls the worker stops by itself (`_closing`), and a
        # backend that was not interrupted may serve on elsewhere (a test's shared backend, say).
        if self._in_call.is_set():
            self._backend.interrupt()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a dead worker must not stop the shutdown
                log.exception("the scheduler's worker had failed")
        for item in running:
            _fail(item.request, NotReady("server is shutting down"))
        for share in self._shares.values():
            for item in share.items():
                item.request.queued = 0
                _fail(item.request, NotReady("server is shutting down"))
        self._shares.clear()
        self._rotation.clear()
        self._waiting_requests = self._waiting_tokens = 0
        self._publish_depth()
        try:  # an interrupted forward returns within a step; a backend that cannot be interrupted may take longer
            await asyncio.wait_for(asyncio.to_thread(self._executor.shutdown, wait=True), STOP_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("the forward still running after %.0f s is abandoned", STOP_WAIT_S)

    @property
    def queued_requests(self) -> int:
        """Requests with sequences waiting for the model (the klservice_queue_depth gauge)."""
        return self._waiting_requests

    @property
    def active_jobs(self) -> int:
        """Jobs with work queued: the only jobs the scheduler holds state for."""
        return sum(len(share.jobs) for share in self._shares.values())

    # --- submitting -------------------------------------------------------------------

    async def score(
        self,
        batch: Batch,
        temperature: float,
        job: str,
        deadline: float | None = None,
        share: str | None = None,
        weight: float = 1.0,
        quota: int = 0,
    ) -> np.ndarray:
        """Reference log-probs of the batch's scored tokens (float32, flat, in order).

        `deadline` is a time.monotonic() value after which the work is dropped unrun. `share` is the
        party the model's time is divided between (the tenant; default: the job itself) and `weight`
        its relative share; a share's jobs take turns, so splitting work over more job ids gains nothing.
        `quota` (0: none) is the most tokens the share may have queued: beyond it the request is refused
        (`Overloaded` with a retry hint; `TooLarge` if the request alone exceeds it) and other shares are
        not affected.
        """
        return await self._submit(batch, temperature, job, deadline, share, weight, quota, None)

    async def teach(
        self,
        batch: Batch,
        temperature: float,
        ask: TeacherAsk,
        job: str,
        deadline: float | None = None,
        share: str | None = None,
        weight: float = 1.0,
        quota: int = 0,
    ) -> tuple[np.ndarray, TeacherOutput]:
        """`score`, with the teacher outputs `ask` asks for (its candidates: [num_scored, C] over the whole batch):
        (log-probs, the sequences' TeacherOutputs concatenated). Never answered from the cache."""
        return await self._submit(batch, temperature, job, deadline, share, weight, quota, ask)

    async def _submit(self, batch: Batch, temperature: float, job: str, deadline: float | None, share: str | None,
                      weight: float, quota: int, ask: TeacherAsk | None):
        if self._closing:
            raise NotReady("server is shutting down")
        self._backend.check_temperature(temperature)  # refuse what the backend cannot do before it takes a queue slot
        if ask is not None:
            self._backend.check_teacher(ask)
        request = _Request(job, share or job, temperature, deadline, asyncio.get_running_loop().create_future(), [], 0)
        if ask is not None:
            request.teacher = []
        items = []
        offsets = np.concatenate([[0], np.cumsum(batch.scored_lengths)]) if ask is not None else None
        for index, (tokens, start) in enumerate(zip(batch.sequences(), batch.prompt_lengths.tolist())):
            mine = None
            if ask is not None:
                rows = None if ask.candidates is None else ask.candidates[offsets[index] : offsets[index + 1]]
                mine = TeacherAsk(ask.top_k, rows)
                request.teacher.append(TeacherOutput.empty(mine))
            if start >= len(tokens):
                request.results.append(np.zeros(0, np.float32))
                continue
            key = self._cache.key(tokens, start, temperature) if self._cache is not None and ask is None else None
            cached = self._cache.get(key) if key is not None else None
            request.results.append(cached)
            if cached is None:
                items.append(_Item(request, index, tokens, start, key, mine))
        if not items:
            return _answer(request)
        if self._waiting_requests >= self._max_queue:
            if self._metrics is not None:
                self._metrics.dropped.labels("queue_full").inc()
            retry_after = self._retry_after()
            raise Overloaded(
                f"queue full ({self._waiting_requests} requests, {self._waiting_tokens} tokens waiting); "
                f"retry in ~{retry_after * 1000:.0f} ms",
                retry_after=retry_after,
            )
        tokens = sum(item.cost for item in items)
        if quota > 0:
            self._check_quota(request.share, weight, tokens, quota)
        request.remaining = request.queued = len(items)
        state = self._shares.get(request.share)
        if state is None:  # a share is in the table exactly while it is in the rotation
            state = self._shares[request.share] = _Share(request.share, deficit=self._debts.pop(request.share, 0.0))
            self._rotation.append(state)
        state.weight = weight
        state.jobs.setdefault(job, collections.deque()).extend(items)
        state.tokens += tokens
        self._waiting_requests += 1
        self._waiting_tokens += tokens
        self._publish_depth()
        request.future.add_done_callback(lambda _: self._finished(request))
        self._wakeup.set()
        return await request.future

    def _check_quota(self, share: str, weight: float, tokens: int, quota: int) -> None:
        """Refuse a request that would take `share` past its quota of queued tokens. The retry hint is the time
        the share's excess takes to drain at its weighted part of the measured rate."""
        if tokens > quota:  # waiting cannot help: like a size refusal, not counted as dropped
            raise TooLarge(
                f"request: {tokens} tokens to queue, over the quota of tenant {share!r}: {quota} queued tokens "
                "(max_queued_tokens in the auth file); split the batch"
            )
        state = self._shares.get(share)
        queued = state.tokens if state is not None else 0
        if queued + tokens > quota:
            if self._metrics is not None:
                self._metrics.dropped.labels("quota").inc()
            others = sum(other.weight for other in self._shares.values() if other.name != share)
            retry_after = self._retry_after(int((queued + tokens - quota) * (weight + others) / weight))
            raise Overloaded(
                f"tenant {share!r} has {queued} tokens queued and its quota is {quota} (max_queued_tokens in the auth "
                f"file); retry in ~{retry_after * 1000:.0f} ms",
                retry_after=retry_after,
            )

    def _finished(self, request: _Request) -> None:
        """A request's future is done: take what it still has queued out of the queue and count why it ended early."""
        future = request.future
        removed = request.queued > 0
        if request.queued:
            state = self._shares.get(request.share)
            queue = state.jobs.get(request.job) if state is not None else None
            if queue is not None:
                kept = [item for item in queue if item.request is not request]
                removed_tokens = sum(item.cost for item in queue) - sum(item.cost for item in kept)
                self._waiting_tokens -= removed_tokens
                state.tokens -= removed_tokens
                if kept:
                    state.jobs[request.job] = collections.deque(kept)
                else:
                    del state.jobs[request.job]
                if not state:
                    self._forget(state)
            request.queued = 0
            self._waiting_requests -= 1
            self._publish_depth()
        if self._metrics is None:
            return
        if future.cancelled() and removed:  # gRPC cancels a call at its deadline, give or take its timer's slack
            expired = request.expired(time.monotonic() + DEADLINE_SLACK_S)
            self._metrics.dropped.labels("deadline" if expired else "cancelled").inc()
        elif isinstance(future.exception(), DeadlineExpired):
            self._metrics.dropped.labels("deadline").inc()

    def _forget(self, share: _Share) -> None:
        """Take a share with nothing queued out of the rotation and the table. A credit goes with it; a debt (what
        it took beyond its quantum, e.g. joining a running step) is kept for when it comes back, for a bounded
        number of shares."""
        if share in self._rotation:
            self._rotation.remove(share)
        self._shares.pop(share.name, None)
        if share.deficit < 0:
            self._debts[share.name] = share.deficit
            self._debts.move_to_end(share.name)
            while len(self._debts) > MAX_DEBTS:
                self._debts.popitem(last=False)

    def _retry_after(self, tokens: int | None = None) -> float:
        """Seconds until `tokens` (default: the whole backlog) should have drained at the measured rate
        (0.05 .. 10 s)."""
        if self._tokens_per_second <= 0:
            return 0.5
        tokens = self._waiting_tokens if tokens is None else tokens
        return float(min(10.0, max(0.05, tokens / self._tokens_per_second)))

    def stop_publishing(self) -> None:
        """Stop setting the queue gauges: another scheduler (the model's next revision) owns them now."""
        self._publishes = False

    def _publish_depth(self) -> None:
        if self._metrics is not None and self._publishes:
            self._metrics.queue_depth.set(self._waiting_requests)
            self._metrics.queue_tokens.set(self._waiting_tokens)

    # --- the worker -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            budget = self.step_budget()  # no call runs meanwhile: the measured rate holds until the step starts
            if self._waiting_tokens < budget and self._max_wait_s > 0:
                await asyncio.sleep(self._max_wait_s)  # let concurrent requests join this step
            chosen = self._select(budget)
            if not any(self._rotation):
                self._wakeup.clear()
            chosen = self._drop_dead(chosen)
            if not chosen:
                continue
            by_temperature: dict[float, list[_Item]] = {}
            for item in chosen:
                by_temperature.setdefault(item.request.temperature, []).append(item)
            self._running = chosen
            try:
                for temperature, items in by_temperature.items():
                    await self._run_step(loop, items, temperature, budget)
            except Exception as error:  # noqa: BLE001 - a bug here must fail this step's requests, not the worker
                log.exception("scheduler step failed")
                for item in chosen:
                    _fail(item.request, _fault(error))
            finally:
                self._running = []

    async def _run_step(self, loop, items: list[_Item], temperature: float, budget: int) -> None:
        """One forward step in the worker thread; its results (or its failure) go back to the requests."""
        started = time.perf_counter()
        self._joiners = []
        try:
            await loop.run_in_executor(self._executor, self._forward, items, temperature, budget, loop)
        except Interrupted:
            for item in items + self._joiners:
                _fail(item.request, NotReady("server is shutting down"))
            return
        except Exception as error:  # noqa: BLE001 - handed to every request in the step, as INTERNAL
            log.exception("forward failed")
            for item in items + self._joiners:
                _fail(item.request, _fault(error))
            return
        elapsed = time.perf_counter() - started
        tokens = sum(item.cost for item in items + self._joiners)
        rate = tokens / max(elapsed, 1e-6)
        self._tokens_per_second = rate if self._tokens_per_second == 0 else 0.8 * self._tokens_per_second + 0.2 * rate

    def step_budget(self) -> int:
        """Tokens the next step may choose: --max-batch-tokens, or less where --max-step-seconds bounds the step
        (the measured budget tokens per second × the bound; from the first measured call on)."""
        if self._max_step_s <= 0 or self._budget_tokens_per_second <= 0:  # no bound, or nothing measured yet
            return self._max_batch_tokens
        return int(min(self._max_batch_tokens, max(MIN_STEP_TOKENS, self._budget_tokens_per_second * self._max_step_s)))

    def _select(self, budget: int) -> list[_Item]:
        """Deficit round-robin over shares, weighted, until the step's token budget is chosen; within a share,
        its jobs take turns. A GRPO group is taken whole (`_Share.head_group`), so it is split across steps only when
        it alone exceeds the budget. Shares are charged the tokens they asked for; the budget counts what the step
        will compute (a packing backend computes a group's prompt once)."""
        chosen: list[_Item] = []
        used = taken_tokens = 0
        packed = self._backend.packs
        total_weight = sum(share.weight for share in self._rotation if share)
        if total_weight == 0:
            return chosen
        while self._rotation and used < budget:
            job = self._rotation[0]
            if not job:
                self._forget(job)
                continue
            quantum = max(1.0, budget * job.weight / total_weight)
            size, cost, step_cost = job.head_group(packed)
            # A credit carried over is at most one quantum (or the head group's cost, which may need several
            # visits): a credit earned under a larger budget must not let one share fill every bounded step.
            job.deficit = min(job.deficit, max(quantum, cost)) + quantum
            full = False
            while job and cost <= job.deficit:
                if chosen and used + step_cost > budget:
                    full = True
                    break
                for number in range(size):  # the group's items in order; then the share's next job has its turn
                    taken = self._take(job, rotate=number == size - 1)
                    chosen.append(taken)
                    taken_tokens += taken.cost
                used += step_cost
                if job:
                    size, cost, step_cost = job.head_group(packed)
            if full:
                break
            self._rotation.rotate(-1)
            if not job:
                self._forget(job)
        self._waiting_tokens -= taken_tokens
        self._publish_depth()
        return chosen

    def _take(self, share: _Share, rotate: bool = True) -> _Item:
        """The share's next item, out of the queue: its cost charged to the share's deficit, its request no longer
        waiting once its last item is taken (the caller accounts the tokens). `rotate` False: the job keeps its
        turn (the rest of its group follows)."""
        item = share.pop(rotate)
        share.deficit -= item.cost
        item.request.queued -= 1
        if item.request.queued == 0:
            self._waiting_requests -= 1
        return item

    def _drop_dead(self, items: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in items:
            request = item.request
            if request.future.done():
                continue
            if request.expired(now):  # counted as dropped by _finished
                _fail(request, DeadlineExpired("deadline passed before the request reached the model"))
                continue
            live.append(item)
        return live

    def _forward(self, items: list[_Item], temperature: float, budget: int, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in the worker thread: plan the backend calls and run them. Each call's values go back to the event
        loop as soon as that call is done, so a request whose sequences are all in an early call of the step is
        answered then, not when the whole step is. Between two calls, work of shares that have nothing in this
        step (jobs that were idle when it was formed) joins it as the next call (`_take_joiners`): a small
        request arriving during a long step waits for one call, not for the rest of the step and the next."""
        joined = {item.request.share for item in items}
        calls = plan_calls([item.tokens for item in items], [item.start for item in items], budget,
                           self._call_padding, self._backend.packs, self._max_batch_tokens)
        for number, call in enumerate(calls):
            if self._closing:  # stopping: no further call of this step starts (a backend may not be interruptible)
                raise Interrupted("the server is stopping")
            self._call(loop, [items[i] for i in call.indices], call.prompt_groups, temperature)
            if number == len(calls) - 1:
                break
            joiners = self._joiners_from_worker(loop, joined, temperature)
            if joiners:
                joined.update(item.request.share for item in joiners)
                sequences = [item.tokens for item in joiners]
                for extra in plan_calls(sequences, [item.start for item in joiners], self._max_batch_tokens,
                                        self._call_padding, self._backend.packs):
                    self._call(loop, [joiners[i] for i in extra.indices], extra.prompt_groups, temperature)

    def _joiners_from_worker(self, loop, joined: set[str], temperature: float) -> list[_Item]:
        """`_take_joiners`, asked from the worker thread of the event loop (which owns the queues)."""
        if self._closing:
            return []
        try:
            future = asyncio.run_coroutine_threadsafe(self._take_joiners(joined, temperature), loop)
        except RuntimeError:  # the loop is closed: the server is gone
            return []
        try:
            return future.result(timeout=30)
        except concurrent.futures.TimeoutError:  # a loop this slow is stopping: whatever it took is answered
            future.add_done_callback(
                lambda done: [_fail(item.request, NotReady("the scheduler is stalled; retry")) for item in done.result()]
                if not done.cancelled() and done.exception() is None else None
            )
            return []

    async def _take_joiners(self, joined: set[str], temperature: float) -> list[_Item]:
        """Queued work of the shares not in this step (`joined`), at its temperature, up to --max-batch-tokens / 8
        tokens (or the step budget, if smaller) per share and in all: taken out of the queue (each share's deficit is charged, as `_select` does)
        and counted as running. A share joins a step once, so a step grows by a bounded amount."""
        if self._closing:
            return []
        budget, used, taken = max(1, min(self._max_batch_tokens // 8, self.step_budget())), 0, []
        for share in list(self._rotation):
            if share.name in joined or not share:
                continue
            while share and share.head().request.temperature == temperature and used + share.head().cost <= budget:
                taken.append(self._take(share))
                used += taken[-1].cost
            if not share:
                self._forget(share)
            if used >= budget:
                break
        self._waiting_tokens -= used
        self._publish_depth()
        taken = self._drop_dead(taken)
        self._running.extend(taken)
        self._joiners.extend(taken)
        return taken

    def _call(self, loop, items: list[_Item], prompt_groups, temperature: float) -> None:
        """One backend call (in the worker thread); its checked values go to the event loop at once."""
        batch = [item.tokens for item in items]
        starts = [item.start for item in items]
        started = time.perf_counter()
        self._in_call.set()
        asks = [item.ask for item in items]
        teacher = {"teacher": asks} if any(ask is not None for ask in asks) else {}  # a backend without it: not passed
        try:
            scored = self._backend.score(batch, starts, temperature, prompt_groups, **teacher)
        finally:
            self._in_call.clear()
        elapsed = time.perf_counter() - started
        if len(scored.values) != len(batch):
            raise BackendFault(f"the backend returned {len(scored.values)} results for {len(batch)} sequences")
        # The call's cost in the step budget's terms (as `_select` and `plan_calls` count it): the tokens a packing
        # backend computes, else count × longest.
        padded = len(batch) * max(len(tokens) for tokens in batch)
        cost = sum(packed_tokens(batch, starts, unit) for unit in prompt_groups) if self._backend.packs else padded
        rate = cost / max(elapsed, 1e-6)
        self._budget_tokens_per_second = rate if self._budget_tokens_per_second == 0 else 0.7 * self._budget_tokens_per_second + 0.3 * rate
        if self._metrics is not None:
            metrics = self._metrics
            metrics.forward_seconds.observe(elapsed)
            metrics.batch_sequences.observe(len(batch))
            metrics.batch_tokens.observe(padded if scored.positions is None else scored.positions)
            # Real positions: each sequence's inputs (its last token is only a target), a shared prompt once.
            metrics.tokens_forwarded.inc(sum(len(tokens) - 1 for tokens in batch) - scored.tokens_saved)
            metrics.tokens_saved.inc(scored.tokens_saved)
        values = [_checked(output, len(item.tokens) - item.start) for item, output in zip(items, scored.values)]
        taught = [None] * len(items)
        if teacher:
            if scored.teacher is None or len(scored.teacher) != len(items):
                raise BackendFault("the backend returned no teacher outputs for a call that asked for them")
            taught = [None if item.ask is None else _checked_teacher(output, len(item.tokens) - item.start, item.ask)
                      for item, output in zip(items, scored.teacher)]
        loop.call_soon_threadsafe(self._scatter, items, values, taught)

    def _scatter(self, items: list[_Item], values: list[np.ndarray], taught: list) -> None:
        for item, value, output in zip(items, values, taught):
            request = item.request
            if not np.isfinite(value).all():  # a model failure, not the caller's: INTERNAL, and never cached
                log.error("the backend returned non-finite log-probs (job %s, %d tokens)", request.job, len(item.tokens))
                _fail(request, BackendFault("the backend returned non-finite log-probs"))
                continue
            if (value > LOGPROB_SLACK).any():  # not a log-probability: the backend's failure, never cached
                log.error("the backend returned log-probs above 0 (largest %g; job %s, %d tokens)", float(value.max()),
                          request.job, len(item.tokens))
                _fail(request, BackendFault("the backend returned log-probs above 0"))
                continue
            if self._cache is not None and item.cache_key is not None:
                self._cache.put(item.cache_key, value)
            if request.future.done():
                continue
            request.results[item.index] = value
            if output is not None:
                request.teacher[item.index] = output
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(_answer(request))


def _checked(output, expected: int) -> np.ndarray:
    """A backend's values for one sequence, checked against what was asked: a 1-D floating array of `expected`
    log-probs (float32 from here on); BackendFault otherwise."""
    array = np.asarray(output)
    if array.ndim != 1 or array.shape[0] != expected or array.dtype.kind != "f":
        raise BackendFault(
            f"the backend returned {array.dtype} values of shape {array.shape} for a sequence with {expected} tokens "
            "to score"
        )
    return array.astype(np.float32, copy=False)


def _fault(error: BaseException) -> BaseException:
    """What a request failed by the backend (or by a bug in a step) gets: a BackendFault, INTERNAL, whatever the
    cause; a shutdown stays a shutdown."""
    if isinstance(error, (NotReady, BackendFault)):
        return error
    fault = BackendFault(f"the forward failed: {type(error).__name__}: {error}")
    fault.__cause__ = error
    return fault


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)


def _concatenate(parts: list) -> np.ndarray:
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def _answer(request: _Request):
    """What a finished request gets: its log-probs, and with teacher outputs asked, theirs concatenated."""
    values = _concatenate(request.results)
    if request.teacher is None:
        return values
    parts = request.teacher
    return values, TeacherOutput(*(np.concatenate([getattr(part, name) for part in parts]) for name in
                                   ("top_ids", "top_logprobs", "candidate_logprobs", "rest_logmass")))


def _checked_teacher(output, expected: int, ask: TeacherAsk) -> TeacherOutput:
    """A backend's teacher outputs for one sequence, checked as `_checked` checks log-probs: the shapes asked
    for, top and candidate log-probs finite and at most 0, rests at most 0; BackendFault otherwise."""
    shapes = {"top_ids": (expected, ask.top_k), "top_logprobs": (expected, ask.top_k),
              "candidate_logprobs": (expected, ask.width), "rest_logmass": (expected,)}
    if not isinstance(output, TeacherOutput) or any(np.shape(getattr(output, name)) != shape
                                                    for name, shape in shapes.items()):
        raise BackendFault(f"the backend returned teacher outputs of other shapes than asked ({shapes})")
    for name in ("top_logprobs", "candidate_logprobs"):
        values = getattr(output, name)
        if not np.isfinite(values).all() or (values > LOGPROB_SLACK).any():
            raise BackendFault(f"the backend returned {name} that are not log-probs")
    if (np.nan_to_num(output.rest_logmass, nan=1.0) > LOGPROB_SLACK).any():
        raise BackendFault("the backend returned a rest of the mass that is not a log-probability")
    return TeacherOutput(output.top_ids.astype(np.int32, copy=False),
                         output.top_logprobs.astype(np.float32, copy=False),
                         output.candidate_logprobs.astype(np.float32, copy=False),
                         output.rest_logmass.astype(np.float32, copy=False))
