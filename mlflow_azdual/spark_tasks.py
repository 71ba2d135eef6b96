"""Detection of a running PySpark task in this process.

A PySpark Python worker is forked from pyspark's daemon and ends with ``os._exit`` or a signal
(SIGHUP when the daemon shuts down, SIGKILL for an idle or cancelled worker), so exit handlers
do not run there. The dual store uses this check to send a task's writes before the call
returns. It never imports pyspark: a process that has not imported it runs no task.
"""

import sys


def in_spark_task() -> bool:
    """Return True while a PySpark task runs in this process (pyspark.TaskContext is set)."""
    if "pyspark" not in sys.modules:
        return False
    try:
        from pyspark import TaskContext
    except ImportError:
        return False
    return TaskContext.get() is not None
