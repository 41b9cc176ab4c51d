# Hydra finds sweepers only among the modules of the hydra_plugins namespace; the sweeper itself lives in tunelab.
from tunelab.study_sweeper import StudySweeper  # noqa: F401
