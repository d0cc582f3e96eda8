"""Tooling around the services, not part of them at run time: the local servers of `make run`
and `make test` (devenv), the migration and dead-letter commands, and the whole-system `Stack`
that the tests and the benchmark start."""
