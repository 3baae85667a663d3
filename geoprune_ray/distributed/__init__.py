"""The method distributed on Ray: probe actors, sensitivity tasks, the Tune searcher, trials, the pipeline.

Ray code here holds no math: every number comes from ``geoprune_ray.core``.
"""
