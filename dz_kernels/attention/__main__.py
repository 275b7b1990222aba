"""`python -m dz_kernels.attention`: print the tile-schedule build times and tile counts at the DROID shapes."""
from .schedule import _main

_main()
