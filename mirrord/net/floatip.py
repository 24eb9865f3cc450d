"""The floating IP: added beside the appliance's public address, removed on release.

The address goes on the interface that carries this appliance's public
address, with the floating IP's own prefix, as a secondary address, so the
appliance's own address keeps working whichever holds the floating one.
"""

from __future__ import annotations

import ipaddress

from mirrord.errors import MirrordError


def _interface_index(ipr: object, address: ipaddress.IPv4Address) -> int:
    for a in ipr.get_addr(family=2):  # type: ignore[attr-defined]
        if a.get_attr("IFA_ADDRESS") == str(address):
            return int(a["index"])
    raise MirrordError(f"No interface carries {address}; cannot place the floating IP beside it.")


def held(floating: ipaddress.IPv4Interface) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return any(a.get_attr("IFA_ADDRESS") == str(floating.ip) for a in ipr.get_addr(family=2))


def add(floating: ipaddress.IPv4Interface, beside: ipaddress.IPv4Address) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        index = _interface_index(ipr, beside)
        try:
            ipr.addr("add", index=index, address=str(floating.ip), prefixlen=floating.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: we already hold it
                raise MirrordError(f"Could not add floating IP {floating}: {exc}.") from exc


def remove(floating: ipaddress.IPv4Interface) -> bool:
    """Release the address; True if it was held."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            if a.get_attr("IFA_ADDRESS") == str(floating.ip):
                try:
                    ipr.addr("del", index=a["index"], address=str(floating.ip), prefixlen=a["prefixlen"])
                except NetlinkError as exc:
                    raise MirrordError(f"Could not remove floating IP {floating}: {exc}.") from exc
                return True
    return False
