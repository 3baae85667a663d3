"""The app layer, above everything else: the ``geoprune`` command (``cli``), submitting to a cluster through the Ray
Jobs API (``submit``), ``report.md`` and its plots (``report``), the evidence table over seeds (``evidence``), exporting
a run's model (``export``), and the CLI's spec loaders (``spec``). Nothing below this package imports it: the CLI
hands the driver its report renderer."""
