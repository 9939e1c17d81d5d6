"""A real inference engine for the tests: a tiny random-weight Qwen2-VL built locally, served by ``transformers serve``."""
