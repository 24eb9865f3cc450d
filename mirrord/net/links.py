"""Whether this appliance's own network links are up, read over netlink.

A node whose cables are all out must not conclude that its peer died: it is
the isolated one. (``/sys/class/net`` is not used: inside a lab node it shows
the host's interfaces; netlink answers for the node's own namespace.)
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


def any_link_up(addresses: Iterable[ipaddress.IPv4Address]) -> bool:
    """True if at least one interface carrying one of ``addresses`` is up with carrier."""
    from pyroute2 import IPRoute  # lazy: not every command needs netlink

    wanted = {str(a) for a in addresses}
    with IPRoute() as ipr:
        indexes = {a["index"] for a in ipr.get_addr(family=2) if a.get_attr("IFA_ADDRESS") in wanted}
        for link in ipr.get_links():
            if link["index"] in indexes and link["flags"] & IFF_UP and link["flags"] & IFF_LOWER_UP:
                return True
    return False
