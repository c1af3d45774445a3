"""A small reference trainer whose resume is gated by ckpttool: bit-exact, crash-safe, torchrun-ready."""
