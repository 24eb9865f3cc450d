"""The IPv4 addresses configured on this machine (its network namespace), read over netlink."""

from __future__ import annotations

import ipaddress


def local_addresses() -> set[ipaddress.IPv4Address]:
    from pyroute2 import IPRoute  # lazy: pyroute2's import cost stays out of commands that do not need it

    with IPRoute() as ipr:
        return {ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=2)}
