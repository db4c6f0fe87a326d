"""Edges: the CLI, file formats, and (later) the simulator and exporters.

Edges may import anything of ours; nothing of ours imports the edges.
"""
