"""stat_exp: Skill-Targeted Adaptive Training (STAT) of language models."""

__version__ = "0.1.0"
