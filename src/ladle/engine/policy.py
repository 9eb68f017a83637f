"""Scheduling policies: who of the waiting requests goes next, and who gives way under KV pressure.

The scheduler owns the mechanics (budgets, blocks, chunks); a policy only answers its questions:
the order in which waiting requests are considered, which running request is preempted when the
KV cache runs out, and whether a newcomer may take a running request's blocks. It hears what each
step scheduled and when requests enter and leave the scheduler, so it can keep its own counts.

- `fcfs`: queue order; the newest running request gives way; newcomers wait for blocks.
- `priority`: lower `Request.priority` first (then arrival); a newcomer preempts a running request
  of a higher value.
- `vtc`: fair sharing between tenants (Sheng et al., OSDI'24, "Fairness in Serving Large Language
  Models"): a virtual token counter per tenant grows by (prompt tokens + 2 x output tokens) /
  weight as they are served; waiting requests go by priority, then least-served tenant, then queue
  order. A tenant that comes back with nothing queued or running is lifted to the least counter
  among the tenants that have requests, so idling earns no credit. With one tenant it orders as
  FCFS does.

Plain Python, no tensors. Variants plug in by name through `register` (`POLICY_NAMES` are the
names config.POLICIES and the CLI offer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from ladle.errors import LadleError

if TYPE_CHECKING:
    from ladle.engine.request import Request
    from ladle.engine.scheduler import ScheduledChunk

OUTPUT_TOKEN_COST = 2.0  # VTC: an output token counts as two prompt tokens (it costs a step of its own)


class SchedulingPolicy:
    """FCFS, and the questions every policy answers; subclasses override what they change."""

    name = "fcfs"
    preempts_for_seqs = False  # may_preempt is asked at max_num_seqs too, not only when blocks run out

    def order(self, waiting: Sequence[Request]) -> Iterable[Request]:
        """The waiting requests (given in queue order) in the order admission considers them."""
        return list(waiting)

    def pick_victim(self, running: Sequence[Request]) -> Request:
        """The running request (running is in admission order) to preempt when blocks run out."""
        return running[-1]  # the newest

    def may_preempt(self, newcomer: Request, victim: Request) -> bool:
        """May a waiting request that finds no blocks take them from `victim` (pick_victim's)?"""
        return False

    def on_arrival(self, request: Request) -> None:
        """The request entered the scheduler (once: a preempted one coming back is no arrival)."""

    def on_finished(self, request: Request) -> None:
        """The request left the scheduler: finished, aborted or timed out."""

    def on_scheduled(self, chunks: Sequence[ScheduledChunk]) -> None:
        """What one step computes: per chunk, its prompt and output tokens (ScheduledChunk)."""


_REGISTRY: dict[str, Callable[[], SchedulingPolicy]] = {}


def register(name: str):
    """Class decorator: make a policy available by `name` (its creator takes no arguments)."""

    def add(cls):
        _REGISTRY[name] = cls
        return cls

    return add


def create_policy(name: str) -> SchedulingPolicy:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise LadleError(f"unknown scheduling policy {name!r} (choose {', '.join(_REGISTRY)})") from None


register("fcfs")(SchedulingPolicy)


@register("priority")
class PriorityPolicy(SchedulingPolicy):
    name = "priority"

    def order(self, waiting):
        return sorted(waiting, key=lambda r: (r.priority, r.arrival_s))

    def pick_victim(self, running):
        return max(running, key=lambda r: (r.priority, r.arrival_s))

    def may_preempt(self, newcomer, victim):
        return (victim.priority, victim.arrival_s) > (newcomer.priority, newcomer.arrival_s)


@register("vtc")
class VirtualTokenCounter(SchedulingPolicy):
    """Fair sharing by virtual token counters, one per tenant (docs/tenants.md, "Fair scheduling")."""

    name = "vtc"
    preempts_for_seqs = True

    def __init__(self):
        self.counters: dict[str, float] = {}  # tenant → service received, in weighted tokens
        self.num_active: dict[str, int] = {}  # tenant → its requests in the scheduler (waiting or running)

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    # -- bookkeeping ---------------------------------------------------------------------------

    def on_arrival(self, request):
        tenant = request.tenant
        if not self.num_active.get(tenant):  # back from idle: no credit for the time away
            active = [self.counters.get(t, 0.0) for t, n in self.num_active.items() if n]
            if active:
                self.counters[tenant] = max(self.counter(tenant), min(active))
        self.num_active[tenant] = self.num_active.get(tenant, 0) + 1

    def on_finished(self, request):
        tenant = request.tenant
        left = self.num_active.get(tenant, 0) - 1
        if left > 0:
            self.num_active[tenant] = left
            return
        self.num_active.pop(tenant, None)
        if not self.num_active:  # nobody in the system: nothing left to be fair about
            self.counters.clear()

    def on_scheduled(self, chunks):
        for chunk in chunks:
            r = chunk.request
            cost = chunk.num_prompt_tokens + OUTPUT_TOKEN_COST * chunk.num_output_tokens
            self.counters[r.tenant] = self.counter(r.tenant) + cost / r.weight

    # -- decisions -----------------------------------------------------------------------------

    def order(self, waiting) -> Iterator[Request]:
        """Each tenant's queue (priority first, queue order kept), merged by least counter: every
        request taken lifts its tenant's projected counter by its prompt, so the free slots of one
        step are shared out too. Ties go to the request earlier in the queue."""
        position = {id(r): i for i, r in enumerate(waiting)}
        queues: dict[str, list[Request]] = {}
        for r in sorted(waiting, key=lambda r: r.priority):  # stable: queue order within a class
            queues.setdefault(r.tenant, []).append(r)
        projected = {t: self.counter(t) for t in queues}
        heads = dict.fromkeys(queues, 0)
        while heads:
            tenant = min(heads, key=lambda t: self._key(queues[t][heads[t]], projected[t], position))
            r = queues[tenant][heads[tenant]]
            yield r
            projected[tenant] += (r.num_tokens - r.num_computed_tokens) / r.weight
            heads[tenant] += 1
            if heads[tenant] == len(queues[tenant]):
                del heads[tenant]

    @staticmethod
    def _key(r: Request, counter: float, position: dict[int, int]) -> tuple:
        return (r.priority, counter, position[id(r)])

    def pick_victim(self, running):
        """The most-served tenant's newest request (a lower class, a higher priority value, first)."""
        index = {id(r): i for i, r in enumerate(running)}
        return max(running, key=lambda r: (r.priority, self.counter(r.tenant), index[id(r)]))

    def may_preempt(self, newcomer, victim):
        """For a more urgent class; within a class, for another tenant only when the victim's tenant
        is ahead by more than both requests' whole cost (prompt + 2 x max output, weighted): VTC's
        own bound on how far apart backlogged tenants drift. Within it the counters even out as
        requests finish, so two busy tenants never preempt each other back and forth; a tenant far
        behind (one that just came back beside a flood) gets a slot now, not after a finish."""
        if newcomer.priority != victim.priority:
            return victim.priority > newcomer.priority
        if newcomer.tenant == victim.tenant:
            return False
        margin = self._request_cost(newcomer) + self._request_cost(victim)
        return self.counter(newcomer.tenant) + margin < self.counter(victim.tenant)

    @staticmethod
    def _request_cost(r: Request) -> float:
        return (r.num_prompt_tokens + OUTPUT_TOKEN_COST * r.max_output_tokens) / r.weight


POLICY_NAMES = tuple(_REGISTRY)  # the names offered, in registration order
