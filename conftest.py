# Repository root on sys.path for the tests (benchmarks.peer loads product-key-memory 0.3.0).
