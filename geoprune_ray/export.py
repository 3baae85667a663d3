"""``export``'s old home: it lives in ``app.export`` (the app layer). Kept for one release (issue 14): this name is the same
module object, so ``geoprune_ray.export.X`` and ``geoprune_ray.app.export.X`` are one thing."""

import sys

from .app import export

sys.modules[__name__] = export
