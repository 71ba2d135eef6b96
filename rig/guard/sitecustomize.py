"""Install the loopback guard at interpreter start-up.

Python imports `sitecustomize` from sys.path at start-up, so a process started with this
folder on PYTHONPATH rejects network access to any host but this machine from its first line.
"""

import loopback_guard

loopback_guard.install()
