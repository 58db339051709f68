"""``SequentialStep``: the old name of ``jacgrad.compiled.TrainingStep``, the one compiled step."""

from .compiled import SequentialStep, TrainingStep

__all__ = ["SequentialStep", "TrainingStep"]
