"""Measurement and reports around the runtime (never on its per-token path): memory profiles,
quality evaluation, budget sweeps, config-only estimates, charts."""
