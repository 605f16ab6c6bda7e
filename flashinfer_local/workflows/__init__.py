"""Multi-step jobs built on the runtime: fetching the default model, resolving MODEL to a bundle
(converting on first use), calibrating sparsity predictors."""
