"""The sidecar's benchmark: ``uv run --extra fast python -m bench`` (see README "Performance").

Not part of the test run; ``tests/test_bench_smoke.py`` runs it in ``--smoke`` mode
so the machinery cannot rot.
"""
