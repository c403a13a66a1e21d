"""autotune: a hardware-aware auto-tuner for transformer inference."""

__version__ = "0.1.0"
