"""Loopback guard for the pytest process and for child processes of tests.

`install()` guards the current process. `GUARD_PATH` is the folder to put on PYTHONPATH so
that a child Python process installs the guard through `sitecustomize`.
"""

import sys
from pathlib import Path

GUARD_PATH = Path(__file__).resolve().parent

# A process with GUARD_PATH on sys.path may already have imported the module under its
# top-level name from sitecustomize. Reusing that module keeps one hook and one error class.
_module = sys.modules.get("loopback_guard")
if _module is None or Path(_module.__file__).resolve().parent != GUARD_PATH:
    from rig.guard import loopback_guard as _module

install = _module.install
is_loopback_host = _module.is_loopback_host
NonLoopbackAddressError = _module.NonLoopbackAddressError

__all__ = ["GUARD_PATH", "install", "is_loopback_host", "NonLoopbackAddressError"]
