"""fluxgymd: long LoRA trainings as systemd services."""

__version__ = "0.1.0"
