"""Fork safety: locks that are replaced by new ones in a child process after ``os.fork``.

A lock that a parent thread held at the moment of the fork stays held forever in the child,
where that thread does not exist. Objects register their lock attributes here, and the child
gets fresh locks before any of its code runs.
"""

import os
import threading
import weakref

_owners = []


def renew_after_fork(owner, attribute: str, factory=threading.Lock) -> None:
    """Replace ``owner.<attribute>`` with ``factory()`` in every child forked from now on."""
    _owners.append((weakref.ref(owner), attribute, factory))


def _renew_locks() -> None:
    alive = []
    for reference, attribute, factory in _owners:
        owner = reference()
        if owner is not None:
            setattr(owner, attribute, factory())
            alive.append((reference, attribute, factory))
    _owners[:] = alive


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks)
