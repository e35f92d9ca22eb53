"""Pairing a bag's streams by header stamp in one pass, holding only the messages of a short window."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmtk.data.sources.pairing import associate_by_time

# A message is waited for while the bag's log time is within this of it: a partner logged later than this (a
# stream that stopped, or stamps running this far against the log order) is not waited for, so memory stays bounded.
MAX_STREAM_LAG_S = 2.0


class StreamPairer:
    """Pairs colour messages with a message of every other stream as they arrive, in one pass over a bag.

    Pairing is one-to-one by header stamp within ``max_dt``, closest pairs first (:func:`associate_by_time`, like
    message_filters' approximate policy; repeated stamps are paired in log order), whatever order the stamps run
    in. A colour message is decided once it has a partner on every stream and every stream has reached 2 x max_dt
    past its stamp (no closer partner can follow), or once the bag's log time is :data:`MAX_STREAM_LAG_S` past the
    time it was logged (a partner still missing then is not waited for: the message is dropped). Messages of other
    streams are kept until taken or until as old. So only the messages of that window wait in memory, whatever the
    bag's length. Payloads are opaque (raw messages): only the paired ones are ever decoded.
    """

    def __init__(self, roles: list[str], max_dt: float) -> None:
        self.roles, self.max_dt = roles, max_dt
        self.pending: dict[str, list[tuple[float, float, Any]]] = {role: [] for role in roles}  # stamp, log time
        self.latest = {role: -np.inf for role in roles}
        self.logged = -np.inf  # the bag's newest log time so far (s)
        self.seen = {role: 0 for role in roles}

    def add(self, role: str, stamp: float, payload: Any, log_time: float | None = None) -> list[tuple[float, dict]]:
        """Take one message (``log_time``: when the recorder logged it, s; default its stamp); return the frames
        (colour stamp, role -> payload) this decides."""
        log_time = stamp if log_time is None else log_time
        self.pending[role].append((stamp, log_time, payload))
        self.latest[role] = max(self.latest[role], stamp)
        self.logged = max(self.logged, log_time)
        self.seen[role] += 1
        return self._decide(min(self.latest.values()) - 2 * self.max_dt, self.logged - MAX_STREAM_LAG_S)

    def finish(self) -> list[tuple[float, dict[str, Any]]]:
        """The frames left once the bag has ended."""
        return self._decide(np.inf, np.inf)

    def _decide(self, horizon: float, expired: float) -> list[tuple[float, dict[str, Any]]]:
        """Decide the colour messages stamped up to ``horizon`` that have partners, and those logged up to
        ``expired``; forget other messages logged up to ``expired``."""
        if not (any(item[0] <= horizon for item in self.pending["rgb"])
                or any(item[1] <= expired for items in self.pending.values() for item in items)):
            return []
        colour = sorted(self.pending["rgb"], key=lambda item: item[:2])
        others = {role: sorted(self.pending[role], key=lambda item: item[:2]) for role in self.roles if role != "rgb"}
        stamps, logs = [item[0] for item in colour], [item[1] for item in colour]
        partners = {role: dict(associate_by_time(stamps, [item[0] for item in items], self.max_dt, logs,
                                                 [item[1] for item in items])) for role, items in others.items()}
        decided, waiting, taken = [], [], {role: set() for role in others}
        for index, item in enumerate(colour):
            paired = all(index in pairs for pairs in partners.values())
            if not ((paired and item[0] <= horizon) or item[1] <= expired):
                waiting.append(item)
            elif paired:
                parts = {"rgb": item[2]}
                for role, pairs in partners.items():
                    parts[role] = others[role][pairs[index]][2]
                    taken[role].add(pairs[index])
                decided.append((item[0], parts))
        self.pending["rgb"] = waiting
        for role, items in others.items():
            self.pending[role] = [item for k, item in enumerate(items) if k not in taken[role] and item[1] > expired]
        return decided
