"""pyprune benchmarks: eager PyTorch vs torch.compile vs every pyprune backend.

``python -m benchmarks`` runs them and writes ``benchmarks/results/<device>/<op>.csv`` and
``<op>.png``; ``pytest benchmarks/ --benchmark-only`` runs the quick cases under pytest-benchmark;
``python -m benchmarks.readme_table`` prints the Markdown table of every stored result, and
``--write benchmarks/results/README.md`` puts it between the markers of that file, whose
measurement notes are written by hand.

The machinery (providers, timing, memory, CSV schema, plots) is in ``harness.py``. An op adds
one file, ``benchmarks/<op>.py``, holding ``CASES`` and ``setup_<op>(case, provider, mode,
device)``; the CLI finds it by that name (see ``harness`` for the contract).
"""
