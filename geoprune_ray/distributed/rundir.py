"""The run directory's old home: it lives in ``core.rundir`` (the run-directory format). Kept for one release."""

from ..core.rundir import RunDir

__all__ = ["RunDir"]
