"""Engine integrations: the vLLM-shaped adapter and the Prometheus exporter.

Public through `eplb_fsm.vllm` and `eplb_fsm.metrics`.
"""
