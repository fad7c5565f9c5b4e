"""Per-face KV slots: which llama.cpp sequence holds which face's conversation, least recently used first."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Collection, Hashable, Iterator

from facellm_edge.errors import UsageError


class MissingSlot(UsageError):
    """A conversation that is not (or no longer) in the KV cache: never prefilled, dropped, or evicted by LRU."""


@dataclass
class Slot:
    """One face's conversation in the KV cache (mutable bookkeeping, private to the generator)."""

    seq: int  # llama.cpp sequence id
    n_past: int = 0  # positions decoded into the cache for this sequence
    asked: bool = False  # the first question has been decoded (next one uses the follow-up template)
    pending: int | None = None  # last generated token, sampled but not yet decoded into the cache


class SlotTable:
    """At most ``capacity`` slots keyed by face; :meth:`touch` marks use, :meth:`lru` names the eviction victim."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: OrderedDict[Hashable, Slot] = OrderedDict()
        self._free = list(range(capacity))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._slots))

    def get(self, key: Hashable) -> Slot:
        return self._slots[key]

    def touch(self, key: Hashable) -> Slot:
        self._slots.move_to_end(key)
        return self._slots[key]

    def full(self) -> bool:
        return not self._free

    def add(self, key: Hashable) -> Slot:
        """A new, empty slot for ``key`` (the caller evicted one first if the table was full)."""
        assert key not in self._slots and self._free, "caller must drop/evict first"
        slot = Slot(seq=self._free.pop(0))
        self._slots[key] = slot
        return slot

    def remove(self, key: Hashable) -> Slot:
        slot = self._slots.pop(key)
        self._free.append(slot.seq)
        self._free.sort()
        return slot

    def lru(self, exclude: Collection[Hashable] = ()) -> Hashable | None:
        """The least recently used key not in ``exclude`` (None when there is none)."""
        for key in self._slots:
            if key not in exclude:
                return key
        return None

    def cells_used(self) -> int:
        return sum(s.n_past for s in self._slots.values())

    def clear(self) -> None:
        self._slots.clear()
        self._free = list(range(self.capacity))
