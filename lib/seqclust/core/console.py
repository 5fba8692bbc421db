"""A quiet console: what native code prints straight to file descriptor 2 goes to a log file.

TensorFlow's C++ runtime (absl) prints its start-up notices before any log level applies, the
JVM prints its own warnings ("Using incubator modules"), netlib's JNI loader prints that it found
no system BLAS, and Spark's log4j console appender writes to the JVM's stderr. None of it passes
through Python's logging. While such code starts — TensorFlow's import, a model's first call, the
JVM's launch (the JVM keeps the descriptor it was started with) — descriptor 2 points at the file
``$SEQCLUST_NATIVE_LOG``, else ``<temp dir>/seqclust-native.log``; ``SEQCLUST_NATIVE_LOG=-``
(the CLI's ``-v``) leaves stderr alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

NATIVE_LOG_ENV = "SEQCLUST_NATIVE_LOG"


def native_log() -> str | None:
    """The file native output goes to, or None when it stays on the console."""
    target = os.environ.get(NATIVE_LOG_ENV) or os.path.join(tempfile.gettempdir(), "seqclust-native.log")
    return None if target == "-" else target


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[str | None]:
    """File descriptor 2 to ``native_log()`` for the block (yields the path, None when left
    alone or the file cannot be opened); Python's own ``sys.stderr`` is flushed around it."""
    target = native_log()
    if target is None:
        yield None
        return
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        yield None
        return
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield target
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
