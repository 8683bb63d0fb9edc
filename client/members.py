"""The member list this hospital controls.

Secure aggregation is only as strong as its member list: a coordinator that could add members
of its own could unmask a hospital. The hospital keeps the members it accepted
(members.json, the `pinned-keys` its ClientApp runs secure aggregation with) apart from
those the coordinator announces (announced.json). An announced member is used only once the
operator accepts it by name and fingerprint (or the home's member policy is accept-all). A
member the coordinator drops (revoked) is dropped here too: fewer members is always safe.
An announced key that differs from an accepted member's key is never taken over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedmri.client.home import HospitalHome, HospitalSettings
from fedmri.common.fingerprint import fingerprint, normalize
from fedmri.common.identity import load_pinned, save_pinned
from fedmri.proto.names import HOSPITAL_NAME

log = logging.getLogger("fedmri.client")


@dataclass(frozen=True)
class MemberView:
    name: str
    fingerprint: str
    state: str  # accepted | announced | key-changed (announced with another key: refused)


def accepted(home: HospitalHome) -> dict[str, bytes]:
    return load_pinned(home.members) if home.members.exists() else {}


def announced(home: HospitalHome) -> dict[str, bytes]:
    return load_pinned(home.announced) if home.announced.exists() else {}


def update(home: HospitalHome, settings: HospitalSettings, offered: dict[str, bytes]
           ) -> list[str]:
    """Take the coordinator's current member list; returns one line per change. Entries that
    are not a valid name with a 32-byte key are ignored (and said)."""
    mine = accepted(home)
    changes = []
    valid = {}
    for name, key in offered.items():
        if HOSPITAL_NAME.fullmatch(name) and len(key) == 32:
            valid[name] = key
        else:
            changes.append(f"ignored a malformed member entry {name[:40]!r}")
    offered = valid
    for name in sorted(set(mine) - set(offered) - {settings.hospital}):
        del mine[name]
        changes.append(f"member {name} left the federation (dropped)")
    waiting = {}
    for name, key in sorted(offered.items()):
        if mine.get(name) == key:
            continue
        if name in mine:
            changes.append(f"the coordinator announces another key for {name} "
                           f"({fingerprint(key)}); kept the accepted one")
            waiting[name] = key
        elif settings.member_policy == "accept-all":
            mine[name] = key
            changes.append(f"member {name} {fingerprint(key)} accepted (policy accept-all)")
        else:
            waiting[name] = key
            if announced(home).get(name) != key:
                changes.append(f"member {name} {fingerprint(key)} announced; accept it with "
                               f"`fedmri client accept {name} {fingerprint(key)}`")
    save_pinned(home.members, mine)
    save_pinned(home.announced, waiting)
    for line in changes:
        log.info("event=members name=%s change=%r", settings.hospital, line)
    return changes


def accept(home: HospitalHome, name: str, expected: str) -> str:
    """Accept announced member `name` if its key has fingerprint `expected`."""
    waiting = announced(home)
    if name not in waiting:
        raise ValueError(f"{name!r} is not an announced member (see `fedmri client members`)")
    key = waiting[name]
    if fingerprint(key) != normalize(expected):
        raise ValueError(f"{name}'s announced key has fingerprint {fingerprint(key)}, not "
                         f"{normalize(expected)}; do not accept it until that is explained")
    mine = accepted(home)
    mine[name] = key
    del waiting[name]
    save_pinned(home.members, mine)
    save_pinned(home.announced, waiting)
    return fingerprint(key)


def view(home: HospitalHome) -> list[MemberView]:
    mine = accepted(home)
    rows = [MemberView(n, fingerprint(k), "accepted") for n, k in sorted(mine.items())]
    rows += [MemberView(n, fingerprint(k), "key-changed" if n in mine else "announced")
             for n, k in sorted(announced(home).items())]
    return rows
