"""probe: a Kubernetes health-probe sidecar that checks whether Triton really serves its models."""

__version__ = "0.1.0"
