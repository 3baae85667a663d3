"""``evidence``'s old home: it lives in ``app.evidence`` (the app layer). Kept for one release (issue 14): this name is the same
module object, so ``geoprune_ray.evidence.X`` and ``geoprune_ray.app.evidence.X`` are one thing."""

import sys

from .app import evidence

sys.modules[__name__] = evidence
