"""`pdpush bench interference`: does P's KV push into D slow D's decode?

cli (options, the run, the 1P1D it starts) · load (background batch and the QPS load) ·
scheduler (D's HoldScheduler, loaded by vLLM with --scheduler-cls) · report (DecodeLatency per
round from D's step probe) · plot (latency and RX figures) · probe_cost (the probe's own cost).
"""
