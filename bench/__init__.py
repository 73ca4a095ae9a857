"""sis-bench: a benchmark harness for diffusion backbones in semantic face image synthesis."""

__version__ = "0.1.0"
