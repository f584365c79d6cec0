"""Benchmarks of the service against its limit and the naive design (`sentiment bench`), and k6 smokes."""
