"""geoprune-ray: hyperparameter-free structured pruning controlled by representation geometry."""

__version__ = "0.1.0"
