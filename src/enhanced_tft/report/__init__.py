"""Report: the run's HTML page and its figures."""
