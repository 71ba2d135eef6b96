"""Local test rig: loopback stand-ins for the Databricks and Azure ML workspaces.

Tests, the demo and the benchmarks share it. Start it with `Rig()` as a context manager or
with `python -m rig up`. It is a development tool and is not part of the wheel.
"""

from rig.servers import DEFAULT_STATE_DIR, Rig

__all__ = ["DEFAULT_STATE_DIR", "Rig"]
