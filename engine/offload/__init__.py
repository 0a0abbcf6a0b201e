"""KV offload: measure the machine (profiler), plan each step (scheduler, placement), hold the host store and
staging (store), execute the plan (runtime, graphs)."""
