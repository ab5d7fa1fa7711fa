"""Speed and memory benchmarks (`make bench`), outside the packages: each prints its figures and
their ratios to a baseline measured in the same run. Run from the repository root:
`python -m benchmarks.build`, `python -m benchmarks.loss_step`, `python -m benchmarks.analysis`."""
