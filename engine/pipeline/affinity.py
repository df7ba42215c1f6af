"""Model affinity: which probe actor generates which work unit, so each model loads on as few
actors as its share of the work needs (about M + N loads for M models on N actors, not M x N).

Ray Data's actor pool hands each block to whichever actor is free, and an actor never sees its
next block; so the stream does not carry units but *tickets* (0 .. units-1), and a probe actor
turns the ticket it was handed into a unit by asking the run's UnitScheduler (a Ray actor on the
driver's node, beside the run log):

- The model-ordered units are cut into one contiguous slice per actor, balanced by rows, cut at a
  model boundary where one is near. An actor takes the next unit of its own slice, so it walks
  through its models one after another and loads each once.
- An actor whose slice is empty steals the second half of the largest remaining slice (cut at a
  model boundary when the half holds one), and walks that in order: a thief never waits while any
  unit is unclaimed, and each steal splits at most one model between two actors.
- A ticket maps to its unit the first time it is claimed and to the same unit ever after: when Ray
  runs a block again (an actor or a node was lost), the retry generates the same rows. There are
  exactly as many tickets as units and each claim takes an unclaimed unit, so every unit runs once
  per ticket run: the stream's exactly-once writing, resume (only pending rows become units), OOM
  splits and failed rows (inside ProbeRunner) are unchanged.
- An actor started after the pool is full (a restart) owns no slice and steals from the start.

A plain class, tested without Ray; engine.pipeline.run hosts it. `coming_models` tells an actor
the next models of its slice, which its node downloads ahead (engine.models.prefetch).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass
class Slice:
    """Units [next, end) of the model-ordered list still to claim, and who owns them."""

    next: int
    end: int
    owner: str | None = None

    def __len__(self) -> int:
        return self.end - self.next


def cut_slices(models: list[str], rows: list[int], actors: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of the units, one per actor, balanced by rows; each cut moves
    to the nearest model boundary when one lies within half an average slice of it."""
    count = len(models)
    actors = max(1, min(actors, count))
    total = sum(rows)
    boundaries = [i for i in range(1, count) if models[i] != models[i - 1]]
    before = [0]
    for r in rows:
        before.append(before[-1] + r)
    cuts = []
    for k in range(1, actors):
        target = total * k / actors
        cut = min(range(1, count), key=lambda i: abs(before[i] - target))
        near = [b for b in boundaries if abs(before[b] - target) <= total / actors / 2]
        if near:
            cut = min(near, key=lambda b: abs(before[b] - target))
        cuts.append(cut)
    edges = [0, *sorted(set(cuts)), count]
    ranges = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    return ranges + [(count, count)] * (actors - len(ranges))


class UnitScheduler:
    """Hands units to probe actors by ticket (see the module doc)."""

    def __init__(self, units: list[str], models: list[str], rows: list[int], actors: int):
        if not (len(units) == len(models) == len(rows)):
            raise ValueError("units, models and rows must be as long as each other")
        self.units = units
        self.models = models
        self.rows = rows
        self.slices = [Slice(a, b) for a, b in cut_slices(models, rows, actors)]
        self.by_ticket: dict[int, int] = {}
        self.own: dict[str, Slice] = {}
        self.steals = 0
        self.claims: dict[str, int] = {}

    def register(self, actor: str) -> str | None:
        """An actor starting: it owns the first slice nobody owns (none after a restart, when the
        pool is full). Returns the first model it will run, to load while it waits."""
        if actor not in self.own:
            free = next((s for s in self.slices if s.owner is None and len(s)), None)
            if free is not None:
                free.owner = actor
                self.own[actor] = free
        mine = self.own.get(actor)
        return self.models[mine.next] if mine is not None and len(mine) else None

    def claim(self, ticket: int, actor: str) -> str:
        """The unit for `ticket` (the same one again when Ray runs the ticket again)."""
        if ticket not in self.by_ticket:
            index = self._next_for(actor)
            if index is None:
                raise RuntimeError(f"ticket {ticket}: every unit is claimed (more tickets than units)")
            self.by_ticket[ticket] = index
            self.claims[actor] = self.claims.get(actor, 0) + 1
        return self.units[self.by_ticket[ticket]]

    def coming_models(self, actor: str, ahead: int = 2) -> list[str]:
        """The next `ahead` distinct models of the actor's slice, in order (for downloads ahead)."""
        mine = self.own.get(actor)
        found: list[str] = []
        if mine is None:
            return found
        for index in range(mine.next, mine.end):
            if self.models[index] not in found:
                found.append(self.models[index])
                if len(found) == ahead:
                    break
        return found

    def model_done(self, model: str) -> bool:
        """True when no unit of `model` is left to claim (its snapshot may be deleted once run)."""
        return not any(self.models[i] == model for s in self.slices for i in range(s.next, s.end))

    def record(self) -> dict:
        return {"slices": len(self.slices), "steals": self.steals, "units_per_actor": dict(sorted(self.claims.items()))}

    def _next_for(self, actor: str) -> int | None:
        mine = self.own.get(actor)
        if mine is None or not len(mine):
            mine = self._steal(actor)
            if mine is None:
                return None
        index = mine.next
        mine.next += 1
        return index

    def _steal(self, actor: str) -> Slice | None:
        victims = [s for s in self.slices if len(s)]
        if not victims:
            return None
        victim = max(victims, key=lambda s: sum(self.rows[s.next:s.end]))
        cut = self._steal_cut(victim)
        stolen = Slice(cut, victim.end, actor)
        victim.end = cut
        old = self.own.get(actor)
        if old is not None and old in self.slices and not len(old):
            self.slices.remove(old)
        self.slices.append(stolen)
        self.own[actor] = stolen
        self.steals += 1
        return stolen

    def _steal_cut(self, victim: Slice) -> int:
        """Where the thief's half starts: the model boundary nearest the middle (by rows) when the
        victim's rest holds one, else the middle unit; the thief takes at least one unit."""
        start, end = victim.next, victim.end
        if end - start == 1:
            return start
        total = sum(self.rows[start:end])
        before, running = {}, 0
        for i in range(start, end):
            before[i] = running
            running += self.rows[i]
        boundaries = [i for i in range(start + 1, end) if self.models[i] != self.models[i - 1]]
        candidates = boundaries or list(range(start + 1, end))
        return min(candidates, key=lambda i: abs(before[i] - total / 2))
