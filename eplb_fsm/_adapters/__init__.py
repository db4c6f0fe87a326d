"""I/O adapters: torch.distributed, CUDA streams and events, process launch.

Adapters may import the core; never the runtime or the edges.
"""
