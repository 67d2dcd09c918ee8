"""bac-node performance benchmarks (see benchmarks/__main__.py and README "Performance")."""
