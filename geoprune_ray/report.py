"""``report``'s old home: it lives in ``app.report`` (the app layer). Kept for one release (issue 14): this name is the same
module object, so ``geoprune_ray.report.X`` and ``geoprune_ray.app.report.X`` are one thing."""

import sys

from .app import report

sys.modules[__name__] = report
