"""The local demo: a CPU Triton with example models, and the sidecar in front of it."""
