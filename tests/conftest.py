import os
import sys

from hypothesis import settings

# The NumPy references live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Property tests draw the same examples on every run (CI must not flake);
# set HYPOTHESIS_PROFILE=explore to search with fresh random examples.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
