"""The benchmark: an open-loop load generator, the PostgreSQL ceiling and a report.

`python -m bench.run` (or `make bench`); see bench/run.py for the options."""
