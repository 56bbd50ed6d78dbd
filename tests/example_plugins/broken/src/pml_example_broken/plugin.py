raise RuntimeError("example_broken fails on import on purpose")
