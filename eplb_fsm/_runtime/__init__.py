"""The runtime: the asyncio (anyio) driver of every model's lifecycle.

It may import the adapters and the core; never the edges.
"""
