"""The simulator behind ``eplb-fsm simulate``: the per-rank serving loop, elastic
scale events, and the merged report.

`options` and `serving` hold what both the loop (`simulate`) and the scale events
(`simulate_elastic`) share, so neither imports the other's caller.
"""
