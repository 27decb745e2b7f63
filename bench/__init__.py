"""Benchmarks and harnesses. Each script runs on its own (``python bench/NAME.py --help``);
the harnesses that tests drive at small sizes (:mod:`bench.fuzz`, :mod:`bench.replicas`) are
also importable as modules of this package (the tests put the repository root on sys.path
through pytest's ``pythonpath`` setting)."""
