"""Speed and memory suites for sae_fast (run from a checkout: python -m benchmarks.<suite>)."""
