"""The reference EP MoE model, its placement-independent arithmetic, and load traces.

Public through `eplb_fsm.reference`.
"""
