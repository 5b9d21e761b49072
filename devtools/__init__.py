"""Developer tools that run from the checkout (tests, benchmarks, `make run`); not shipped in images."""
