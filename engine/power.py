"""Where this machine draws its power from: mains ("ac"), battery, or unknown.

Linux: /sys/class/power_supply/*/{type,online,status,capacity}. macOS: `pmset -g batt`.
Anything else, and desktops or VMs that expose no supply at all: "unknown". Standard
library only, so both the benchmark client and the server import it.
"""

from __future__ import annotations

import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

SYSFS = Path("/sys/class/power_supply")


@dataclass(frozen=True)
class PowerState:
    source: str  # "ac" | "battery" | "unknown"
    battery_percent: int | None = None
    detail: str = ""  # where the answer came from

    def to_dict(self) -> dict:
        return asdict(self)


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def from_sysfs(root: Path = SYSFS) -> PowerState:
    """Mains online -> ac. Else a battery that is discharging (or present with every mains
    supply offline) -> battery. No supplies at all -> unknown."""
    try:
        supplies = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return PowerState("unknown", detail=f"{root} not readable")
    mains, batteries = [], []
    for s in supplies:
        kind = (_read(s / "type") or "").lower()
        if kind in ("mains", "usb", "usb_c", "usb_pd"):
            mains.append((s.name, _read(s / "online") == "1"))
        elif kind == "battery" and _read(s / "present") != "0" and _read(s / "scope") != "Device":
            # scope=Device marks a peripheral's battery (mouse, headset), not the machine's
            cap = _read(s / "capacity")
            batteries.append((s.name, (_read(s / "status") or "").lower(), int(cap) if cap and cap.isdigit() else None))
    percent = batteries[0][2] if batteries else None
    if any(on for _, on in mains):
        return PowerState("ac", percent, "sysfs " + ",".join(n for n, on in mains if on))
    if batteries:
        name, status, _ = batteries[0]
        if status == "discharging" or mains:  # mains listed but all offline
            return PowerState("battery", percent, f"sysfs {name} {status or 'present'}")
        # charging/full/not charging without a visible mains supply: on external power
        return PowerState("ac", percent, f"sysfs {name} {status}")
    return PowerState("unknown", detail="sysfs: no mains or battery supply (desktop or VM)")


def from_pmset(text: str) -> PowerState:
    """Parse `pmset -g batt`: "Now drawing from 'AC Power'" / "'Battery Power'", then "NN%;"."""
    m = re.search(r"drawing from '([^']+)'", text)
    pct = re.search(r"(\d+)%", text)
    percent = int(pct.group(1)) if pct else None
    if not m:
        return PowerState("unknown", percent, "pmset: no power source line")
    src = m.group(1).lower()
    kind = "battery" if "battery" in src else "ac" if "ac" in src else "unknown"
    return PowerState(kind, percent, f"pmset {m.group(1)}")


def detect_power() -> PowerState:
    system = platform.system()
    if system == "Linux":
        return from_sysfs()
    if system == "Darwin":
        try:
            out = subprocess.run(["pmset", "-g", "batt"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return PowerState("unknown", detail=f"pmset failed: {e}")
        return from_pmset(out)
    return PowerState("unknown", detail=f"no detector for {system}")


if __name__ == "__main__":
    print(detect_power())
