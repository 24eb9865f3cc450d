"""What a daemon does when it starts again after a restart, a crash or a reboot (pure).

The rule (docs/operations.md, "After a reboot or a daemon restart"):

* It **never** comes back primary: it does not mount the volume or claim the
  floating IP by itself, whatever it was before.
* It resumes as **secondary** by itself only when all of these hold:
  - its saved state says it was in HA as ``secondary``, ``inconsistent`` or
    ``idle`` (an old primary after failOver) — roles in which its disk only
    ever *followed* a primary, so it holds no write the peer lacks;
  - its saved settings (``ha.json``) name the pair, so the peer is known;
  - its metadata exists and says ``UpToDate``, ``Outdated`` or
    ``Inconsistent`` (an inconsistent copy resumes its sync and is still never
    promoted: the supervisor refuses to promote it).
* Everything else comes back ``standalone``: a restarted *primary* may hold
  writes its secondary never got (it may have run degraded), so only an
  operator may decide that its copy is to be overwritten — ``startHA`` makes
  it the secondary of a primary peer. ``stopHA`` saves ``standalone``, so an
  appliance taken out of HA on purpose stays out.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Modes whose disk only followed a primary: resuming as secondary cannot lose a write.
FOLLOWER_MODES = frozenset({"secondary", "inconsistent", "idle"})
RESUMABLE_DISKS = frozenset({"UpToDate", "Outdated", "Inconsistent"})


@dataclass(frozen=True)
class Restart:
    resume_secondary: bool
    sentence: str


def after_restart(previous_mode: str | None, has_settings: bool, disk_state: str | None) -> Restart:
    """Decide from the saved state, settings and metadata alone (nothing here touches the system)."""
    was = previous_mode or "standalone"
    if was == "standalone":
        return Restart(False, "Daemon started standalone (HA was not running before).")
    if was not in FOLLOWER_MODES:
        return Restart(False, f"Daemon restarted while {was}: coming back standalone. A restarted primary never "
                              "resumes by itself (its disk may hold writes the peer lacks); run startHA to rejoin.")
    if not has_settings:
        return Restart(False, f"Daemon restarted while {was}, but its HA settings (ha.json) are gone: coming back "
                              "standalone; run startHA.")
    if disk_state not in RESUMABLE_DISKS:
        return Restart(False, f"Daemon restarted while {was}, but the disk's metadata is "
                              f"{'missing' if disk_state is None else disk_state}: coming back standalone; run startHA.")
    return Restart(True, f"Daemon restarted while {was}, disk {disk_state}: resuming as secondary by itself "
                         "(never as primary).")
