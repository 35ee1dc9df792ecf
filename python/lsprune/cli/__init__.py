"""The ``lsprune`` command line: demo, prune, inspect, bench."""
