# Hydra finds sweepers only among the modules of the hydra_plugins namespace; the sweeper itself lives in tunelab.
from tunelab.sweep.sweeper import StudySweeper  # noqa: F401
