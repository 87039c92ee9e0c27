"""What runs report: the retrain report (report.json: dense vs slim params, MACs, accuracy, throughput) and the
figures of a search and a plan sweep."""
