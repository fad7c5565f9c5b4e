"""The server's conversations: the :class:`~facellm_edge.runtime.session.FaceSession` of each face a client asked
about, by the session's own random id, kept for follow-ups until unused for ``ttl_s`` or until more than
``max_sessions`` are open (the least recently used goes first). Afterwards their id answers a 404 that says why.

A chat completion conversation is also indexed by what the client sends back on its next turn: the image's sha256,
the face it chose, and the turns so far (questions and answers, as the client holds them). A follow-up whose earlier
turns match a kept conversation continues it (a warm time to first token: no encode, no image prefill); anything
else starts a new one.

Sessions in use by a request (``busy``) are never expired or evicted under it. Closing a session takes the model's
lock (its KV cells are freed), so the store never closes one itself: it hands them to ``on_close``, which the
server runs in a thread of its own. The store is thread-safe (the model's worker thread adds sessions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from facellm_edge.serve.errors import APIError

if TYPE_CHECKING:
    from facellm_edge.runtime.session import FaceSession

__all__ = ["Conversation", "Entry", "SessionStore", "Turns"]

log = logging.getLogger(__name__)

Turns = tuple[tuple[str, str], ...]  # (question, answer) pairs, oldest first
Conversation = tuple[str, str]  # (image sha256, face choice: "largest" | "3" | "all:3")
_TOMBSTONES = 4096  # ids of ended sessions remembered for a precise 404 message


@dataclass
class Entry:
    """A kept session and how it is found again."""

    session: "FaceSession"
    conversation: Conversation | None  # chat completions' index key; None for the native face API
    turns: Turns
    last_used: float
    busy: int = 0


class SessionStore:
    """Sessions by id with a time to live and a least-recently-used bound."""

    def __init__(self, ttl_s: float, max_sessions: int, on_close: Callable[[list["FaceSession"]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._on_close = on_close
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._index: dict[tuple[Conversation, Turns], str] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it ended

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- in -------------------------------------------------------------------------------------------------
    def add(self, session: "FaceSession", conversation: Conversation | None = None) -> Entry:
        """Keep a new session, busy for its creator (who calls :meth:`release` when done with it)."""
        with self._lock:
            entry = Entry(session, conversation, (), self._clock(), busy=1)
            self._entries[session.id] = entry
            closing = self._evict_over_limit()
        self._close(closing)
        return entry

    def acquire(self, session_id: str) -> Entry:
        """The session for a follow-up, busy until :meth:`release`; a 404 naming why when it is gone."""
        with self._lock:
            entry = self._entries.get(session_id)
            closing: list[Entry] = []
            if entry is not None and not entry.busy and self._expired(entry):
                closing = [self._end(session_id, self._ttl_reason())]
                entry = None
            if entry is not None:
                entry.busy += 1
                self._touch(session_id, entry)
        self._close(closing)
        if entry is None:
            raise self.gone(session_id)
        return entry

    def check(self, session_id: str) -> None:
        """A 404 naming why unless the session is kept (and not expired)."""
        self.release(self.acquire(session_id))

    def claim(self, conversation: Conversation, turns: Turns) -> Entry | None:
        """The kept chat conversation about this image and face whose turns so far are exactly ``turns``, taken
        (busy, unindexed) so no concurrent request continues it too; None when there is none."""
        with self._lock:
            sid = self._index.get((conversation, turns))
            entry = self._entries.get(sid) if sid is not None else None
            if entry is None or entry.busy:
                return None
            closing: list[Entry] = []
            if self._expired(entry):
                closing = [self._end(sid, self._ttl_reason())]
                entry = None
            else:
                del self._index[(conversation, turns)]
                entry.busy += 1
                self._touch(sid, entry)
        self._close(closing)
        return entry

    def release(self, entry: Entry, turns: Turns | None = None) -> None:
        """Done with ``entry`` for now; ``turns``: its conversation after this request (indexed for the next)."""
        with self._lock:
            entry.busy = max(0, entry.busy - 1)
            sid = entry.session.id
            if self._entries.get(sid) is not entry:
                return  # deleted or forgotten meanwhile
            entry.last_used = self._clock()
            if turns is not None:
                if entry.conversation is not None:
                    self._index.pop((entry.conversation, entry.turns), None)
                    self._index[(entry.conversation, turns)] = sid
                entry.turns = turns
            closing = self._evict_over_limit()
        self._close(closing)

    def forget(self, session_id: str, reason: str) -> None:
        """The session ended outside the store (e.g. evicted from the model's KV cache): drop it, remember why."""
        with self._lock:
            closing = [self._end(session_id, reason)] if session_id in self._entries else []
        self._close(closing)

    def delete(self, session_id: str) -> None:
        """Close a session now (``DELETE /v1/faces/{id}``); 404 when it is gone already."""
        with self._lock:
            closing = [self._end(session_id, "was deleted")] if session_id in self._entries else []
        if not closing:
            raise self.gone(session_id)
        self._close(closing)

    def sweep(self) -> int:
        """Close the sessions unused for ``ttl_s``; returns how many."""
        with self._lock:
            closing = [self._end(sid, self._ttl_reason()) for sid, e in list(self._entries.items())
                       if not e.busy and self._expired(e)]
        self._close(closing)
        return len(closing)

    def close_all(self) -> None:
        """Close every session (server shutdown)."""
        with self._lock:
            closing = [self._end(sid, "was closed: the server stopped") for sid in list(self._entries)]
        self._close(closing)

    # -- out ------------------------------------------------------------------------------------------------
    def gone(self, session_id: str) -> APIError:
        """The 404 for a session id that is not (or no longer) kept."""
        with self._lock:
            reason = self._ended.get(session_id)
        if reason is None:
            return APIError(404, f"session {session_id} does not exist (unknown id, or it ended long ago); post the "
                            "image again to start a new one", code="session_not_found", param="session")
        return APIError(404, f"session {session_id} {reason}; post the image again to start a new one",
                        code="session_expired", param="session")

    # -- internals (under the lock) -------------------------------------------------------------------------
    def _ttl_reason(self) -> str:
        return f"expired after {self.ttl_s:g} s without use"

    def _expired(self, entry: Entry) -> bool:
        return self._clock() - entry.last_used > self.ttl_s

    def _touch(self, sid: str, entry: Entry) -> None:
        entry.last_used = self._clock()
        self._entries.move_to_end(sid)

    def _end(self, sid: str, reason: str) -> Entry:
        entry = self._entries.pop(sid)
        if entry.conversation is not None:
            self._index.pop((entry.conversation, entry.turns), None)
        self._ended[sid] = reason
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        return entry

    def _evict_over_limit(self) -> list[Entry]:
        closing = []
        idle = (sid for sid, e in list(self._entries.items()) if not e.busy)
        while len(self._entries) > self.max_sessions:
            sid = next(idle, None)
            if sid is None:
                break  # every kept session is in use right now: over the limit until one is released
            closing.append(self._end(sid, f"was closed: more than {self.max_sessions} sessions were open (the "
                                          "least recently used is closed first)"))
        return closing

    def _close(self, entries: list[Entry]) -> None:
        if entries:
            log.debug("closing %d sessions", len(entries))
            self._on_close([e.session for e in entries])
