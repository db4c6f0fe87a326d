"""The pure core: numpy only, no torch.distributed, no CUDA, no asyncio.

Nothing here imports from the adapters, the runtime or the edges; a test
(`tests/test_layering.py`) holds that rule.
"""
