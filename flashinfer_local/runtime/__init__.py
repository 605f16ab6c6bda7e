"""The per-token runtime: what runs between a token id and its logits, and what it owns.

engine (loads a bundle, owns the FFN backend and the selector), session (a KV cache across calls,
sampling, detokenization, stop strings), budget (every byte the engine holds, planned before
loading), the FFN backends (dram, streaming) behind ``backend.FFNBackend``, selection (which
neurons a token computes), options (every engine option, declared once). Imports nothing from
``measure``, ``workflows`` or ``cli``.
"""
