"""Loopback guard: an audit hook that rejects network access to any host but this machine.

`install()` adds a `sys.addaudithook` hook. Name lookups, connects and datagram sends to a
host other than 127.0.0.0/8, ::1 or `localhost` raise NonLoopbackAddressError before any
packet leaves. Unix and other non-IP sockets pass. It guards Python processes only, not
Azurite (Node.js). Standard library only, because `sitecustomize.py` imports this module at
interpreter start-up.
"""

import ipaddress
import socket
import sys

# Audit events that name a remote host, mapped to the position of the host or address in
# the event's arguments (https://docs.python.org/3/library/audit_events.html).
_HOST_ARGUMENT = {
    "socket.getaddrinfo": 0,
    "socket.gethostbyname": 0,
    "socket.gethostbyaddr": 0,
    "socket.getnameinfo": 0,
}
_SOCKET_ADDRESS_ARGUMENT = {
    "socket.connect": 1,
    "socket.sendto": 1,
    "socket.sendmsg": 1,
}
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

_installed = False
_reported_hosts = set()


class NonLoopbackAddressError(RuntimeError):
    """A process under the loopback guard tried to reach a host other than this machine.

    It is a RuntimeError, not an OSError, so that HTTP clients do not treat it as a
    connection failure to retry or hide.
    """


def is_loopback_host(host):
    """Return True if `host` is None, `localhost`, or an IP address in 127.0.0.0/8 or ::1."""
    if host is None:
        return True

    if isinstance(host, (bytes, bytearray)):
        host = host.decode("ascii", errors="replace")
    host = str(host).strip().rstrip(".").lower()
    if host == "localhost":
        return True

    # An IPv6 literal may carry a zone index ("::1%lo") or come in brackets.
    host = host.strip("[]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _host_of(event, args):
    """Return (True, host) if the event names an IP host, (False, None) if it does not."""
    if event in _HOST_ARGUMENT:
        target = args[_HOST_ARGUMENT[event]]
        # getnameinfo receives a socket address tuple, the other lookups a bare host.
        if isinstance(target, tuple):
            target = target[0]
        return True, target

    sock, address = args[0], args[_SOCKET_ADDRESS_ARGUMENT[event]]
    if sock.family not in _IP_FAMILIES or address is None:
        return False, None
    return True, address[0]


def _audit_hook(event, args):
    if event not in _HOST_ARGUMENT and event not in _SOCKET_ADDRESS_ARGUMENT:
        return

    names_host, host = _host_of(event, args)
    if not names_host or is_loopback_host(host):
        return

    # Libraries may catch and hide the error, so the first block per host also goes to stderr.
    message = (
        f"loopback guard rejected {event} for host {host!r}: "
        "only 127.0.0.0/8, ::1 and localhost are allowed"
    )
    if host not in _reported_hosts:
        _reported_hosts.add(host)
        sys.stderr.write(message + "\n")
    raise NonLoopbackAddressError(message)


def install():
    """Install the guard in this process. Calling it again does nothing.

    An audit hook cannot be removed, so the guard stays active until the process exits.
    """
    global _installed
    if _installed:
        return
    sys.addaudithook(_audit_hook)
    _installed = True
