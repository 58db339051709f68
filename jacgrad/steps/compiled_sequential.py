"""``SequentialStep``: the old name of ``jacgrad.steps.compiled.TrainingStep``, the one compiled step."""

from ..core.renamed import renamed
from .compiled import TrainingStep

__all__ = ["TrainingStep"]

__getattr__ = renamed(__name__, {"SequentialStep": ("jacgrad.steps.compiled.TrainingStep", TrainingStep)})
