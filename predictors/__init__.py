"""Sparsity predictors (which FFN neurons a token needs) and their training. Filled by later work;
imports nothing from ``flashinfer_local``."""
