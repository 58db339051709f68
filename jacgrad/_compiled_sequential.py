"""``SequentialStep``: the old name of ``jacgrad.compiled.TrainingStep``, the one compiled step."""

from ._renamed import renamed
from .compiled import TrainingStep

__all__ = ["TrainingStep"]

__getattr__ = renamed(__name__, {"SequentialStep": ("jacgrad.compiled.TrainingStep", TrainingStep)})
