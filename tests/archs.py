"""The architectures every parity test runs on (`monet_fast.model.arch` model types)."""

ARCHS = ("qwen2_5_vl", "qwen3_vl")
