"""ckpttool: inspect, verify, diff, convert and repair deep-learning training checkpoints."""

__version__ = "0.2.0"
