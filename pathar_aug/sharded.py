"""Synthesis over several processes: every rank makes chunks, rank 0 alone writes them, in order.

The chunks still to make (``todo``, rank 0's reading of the dataset, sent to every rank) are dealt
round-robin: in round k, rank r makes chunk ``todo[k * world + r]``; the round's chunks then travel
through the process group to rank 0 (no shared filesystem needed), where the dataset writer takes
them in chunk order. Rank 0 is the only process that touches the dataset, through the same
kill-safe commit as a single process, so a rank that dies (torchrun then stops all of them) leaves
a valid dataset, and the same command completes it: the chunks already committed are skipped, the
others are made again. Chunk c is seeded by (seed, c) wherever it is made, so the pairs do not
depend on the number of processes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from pathar_aug import distributed

# what a rank sends for a chunk: its cases, and the changes to the per-label filter counts
Made = tuple[list, dict[str, dict[str, Any]]]


class ShardedChunks:
    """Chunks of ``todo`` made by every rank; ``get(c)`` on rank 0 returns chunk c's cases."""

    def __init__(self, todo: Sequence[int], make: Callable[[int], Made],
                 merge: Callable[[dict[str, dict[str, Any]]], None]):
        self.todo, self.make, self.merge = list(todo), make, merge
        self.rank, self.world = distributed.rank(), distributed.world()
        self.position = {c: j for j, c in enumerate(self.todo)}
        self.rounds = math.ceil(len(self.todo) / self.world)
        self.done_rounds = 0
        self.ready: dict[int, list] = {}

    def _round(self) -> None:
        j = self.done_rounds * self.world + self.rank
        mine = (self.todo[j], *self.make(self.todo[j])) if j < len(self.todo) else None
        parts = distributed.gather_object(mine)
        if parts is not None:  # rank 0
            for sender, part in enumerate(parts):
                if part is None:
                    continue
                c, cases, counts = part
                self.ready[c] = cases
                if sender != self.rank:  # rank 0's own chunks counted already
                    self.merge(counts)
        self.done_rounds += 1

    def get(self, c: int) -> list:
        """Chunk c's cases (rank 0): waits for its round; a chunk outside the plan is made here."""
        if c not in self.position:
            return self.make(c)[0]
        while c not in self.ready and self.done_rounds < self.rounds:
            self._round()
        return self.ready.pop(c)

    def finish(self) -> None:
        """Take part in every round left: the other ranks' whole work; on rank 0, rounds the writer
        did not ask for (chunks found committed meanwhile)."""
        while self.done_rounds < self.rounds:
            self._round()
        self.ready.clear()


COUNTS = ("candidates", "passed", "kept")


def counting(make_chunk: Callable[[int], Any], labels: dict) -> Callable[[int], Made]:
    """``make_chunk`` returning its cases as a list, with what it added to the per-label counts
    (``LabelAcceptance``: candidates, passed, kept, threshold) of ``labels``."""

    def made(c: int) -> Made:
        before = {name: [getattr(acc, k) for k in COUNTS] for name, acc in labels.items()}
        cases = list(make_chunk(c))
        counts = {name: {**{k: getattr(acc, k) - b for k, b in zip(COUNTS, before[name])}, "threshold": acc.threshold}
                  for name, acc in labels.items()}
        return cases, counts

    return made


def merger(labels: dict) -> Callable[[dict[str, dict[str, Any]]], None]:
    """Adds another rank's counts to ``labels``."""

    def merge(counts: dict[str, dict[str, Any]]) -> None:
        for name, delta in counts.items():
            acc = labels[name]
            for k in COUNTS:
                setattr(acc, k, getattr(acc, k) + delta[k])
            if delta["threshold"] is not None:
                acc.threshold = delta["threshold"]

    return merge
