"""clearml-unified-memory: serve many LLMs on one GPU by tiering them between GPU, RAM and disk."""

from clearml_umem.spec import ModelSpec, SpecError
from clearml_umem.tiers import Tier

__all__ = ["ModelSpec", "SpecError", "Tier", "__version__"]
__version__ = "0.1.0"
