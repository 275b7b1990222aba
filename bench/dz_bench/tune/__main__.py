"""python -m dz_bench.tune: see dz_bench.tune's doc."""
import sys

from dz_bench.tune import main

sys.exit(main())
