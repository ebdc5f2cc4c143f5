"""Power profiles: `plugged` serves at full power, `battery` at lower power, `auto` follows
the machine's power source.

A profile decides three things: torch threads for the next job, which artifact serves
requests for the primary model (battery may name a more compressed one), and the cap on
hybrid loops. `auto` re-reads the power source at most every `poll_s` seconds, lazily when
a request, /v1/models, /profile or /metrics asks; an unknown source (desktop, VM) counts
as plugged. The mode can be changed at run time through `POST /profile`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from engine.power import PowerState, detect_power

MODES = ("plugged", "battery", "auto")


@dataclass(frozen=True)
class Profile:
    name: str  # "plugged" | "battery"
    threads: int | None  # torch intra-op threads; None = leave torch's setting
    model: str | None  # artifact serving requests for the primary model; None = the primary itself
    hybrid_loops: int | None  # cap on hybrid loops; None = no cap

    def to_dict(self) -> dict:
        return asdict(self)


class ProfileManager:
    def __init__(self, mode: str, plugged: Profile, battery: Profile, poll_s: float = 5.0,
                 detect: Callable[[], PowerState] = detect_power,
                 on_change: Callable[[str, PowerState | None], None] = lambda active, power: None):
        if mode not in MODES:
            raise ValueError(f"profile must be one of {', '.join(MODES)}, not {mode!r}")
        self.profiles = {"plugged": plugged, "battery": battery}
        self.poll_s, self._detect, self._on_change = poll_s, detect, on_change
        self._lock = threading.Lock()
        self.mode = mode
        self.power: PowerState | None = None
        self._checked = float("-inf")
        self._active = "battery" if mode == "battery" else "plugged"
        self.switches = 0
        self._reported = None  # (active, power source) last told to on_change
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> Profile:
        """The active profile, re-detecting the power source when `auto` and the last look is stale."""
        with self._lock:
            now = time.monotonic()
            if force or (self.mode == "auto" and now - self._checked >= self.poll_s):
                self.power = self._detect()
                self._checked = now
            if self.mode == "auto":
                active = "battery" if self.power and self.power.source == "battery" else "plugged"
            else:
                active = self.mode
            if active != self._active:
                self.switches += 1
            self._active = active
            state = (active, self.power.source if self.power else None)
            report, self._reported = state != self._reported, state
        if report:  # per request otherwise: only what changed is pushed to the gauges
            self._on_change(active, self.power)
        return self.profiles[active]

    @property
    def active(self) -> Profile:
        return self.profiles[self._active]

    def set_mode(self, mode: str) -> Profile:
        if mode not in MODES:
            raise ValueError(f"profile must be one of {', '.join(MODES)}, not {mode!r}")
        with self._lock:
            self.mode = mode
        return self.refresh(force=True)

    def describe(self) -> dict:
        p = self.refresh()
        return {"mode": self.mode, "active": p.name, "switches": self.switches,
                "power": self.power.to_dict() if self.power else None,
                "profiles": {k: v.to_dict() for k, v in self.profiles.items()}}


def thread_setter(profile: Profile, report: Callable[[int], None] = lambda n: None) -> Callable[[], None]:
    """What the worker runs as a job starts: the profile's torch thread count, set on the
    worker thread itself (the OpenMP thread count is per calling thread), so a profile switch
    applies from the next request on (in a batch, from the next request that joins it).
    `report` is told the count in effect."""

    def start() -> None:
        if profile.threads and torch.get_num_threads() != profile.threads:
            torch.set_num_threads(profile.threads)
        report(torch.get_num_threads())

    return start
