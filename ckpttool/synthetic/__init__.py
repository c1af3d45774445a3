"""Small, healthy checkpoints written by each trainer's real library (where it is installed), and damaged copies of
them, for other projects' CI (`ckpttool fixtures`, the pytest plugin `ckpttool.testing`) and for ckpttool's own suite:
one home for both."""
