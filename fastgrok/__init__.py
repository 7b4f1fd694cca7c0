"""fastgrok: train populations of one-hot MLPs on corrupted modular arithmetic, and analyse how they grok."""

__version__ = "0.1.0"
