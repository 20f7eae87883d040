"""Math with no model: sampling and chain verification, round traces and tau, statistics, calibration
(ECE, STS), the prefix scheduler's policies and cost table, the data-curve fit. Imports nothing of
labkit outside core, and no model: every function here is tested on hand-made tensors."""
