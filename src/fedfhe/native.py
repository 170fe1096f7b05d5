"""What Concrete's native runtime writes straight to the stderr descriptor, kept off the user's terminal.

Its own module, importing nothing of fedfhe, so that the encrypting client silences it without loading compilation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

NATIVE_STDERR = threading.Lock()


@contextlib.contextmanager
def native_quiet() -> Iterator[None]:
    """Hide what Concrete's runtime writes straight to the stderr descriptor ("KeySetCache: miss, regenerating").

    The descriptor is the process's: one thread at a time swaps it, so it always comes back.
    """
    with NATIVE_STDERR:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
