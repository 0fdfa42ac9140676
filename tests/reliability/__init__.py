"""Reliability suite: `probe serve` as a real process against injected faults (issue 6)."""
