"""Helpers for running the tools a user would run instead (llama.cpp, accelerate, AirLLM) under the
same memory condition as this engine (``evict``)."""
