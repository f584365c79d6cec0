"""Benchmarks of the service against its limit and the naive design (`sentiment bench`), the k6 smokes
(`sentiment loadtest`) and the chaos run (`sentiment chaos`)."""
