"""Stand-in libnvidia-ml.so.1 for tests (see build.py)."""
