"""Sparsity predictors (which FFN neurons a token needs) and their training: calibration
statistics, the low-rank predictor, and the predictor files stored in a bundle. Imports nothing
from ``flashinfer_local``."""
