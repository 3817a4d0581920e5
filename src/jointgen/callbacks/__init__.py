"""Lightning callbacks shared by the model families."""

from jointgen.callbacks.sample_grid import SampleGrid

__all__ = ["SampleGrid"]
