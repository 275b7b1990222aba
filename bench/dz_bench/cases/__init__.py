"""Bench case files: one module per bench, bench/dz_bench/cases/<bench>.py, each registering its cases with
`dz_bench.harness.register`. The harness imports every module in this package."""
