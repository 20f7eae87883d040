"""Measurement: side-by-side benchmarks, round costs and Eq. 1, teacher-forced diagnostics. Reads
what the layers below return; never imported by them."""
