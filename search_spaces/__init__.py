"""The knobs autotune searches: knob types, spaces, candidates and presets. Never imports `autotune`."""

from search_spaces.candidate import BIT_WIDTHS, SPARSITY_PATTERNS, Candidate
from search_spaces.hardware import restrict_to_hardware
from search_spaces.knobs import Categorical, FloatRange, IntRange, Knob
from search_spaces.presets import PRESETS, preset
from search_spaces.space import Removal, Space, SpaceError, TeacherShape, with_overrides

__all__ = [
    "BIT_WIDTHS", "SPARSITY_PATTERNS", "PRESETS", "Candidate", "Categorical", "FloatRange", "IntRange", "Knob",
    "Removal", "Space", "SpaceError", "TeacherShape", "preset", "restrict_to_hardware", "with_overrides",
]
