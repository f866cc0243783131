"""`compress sweep`: many variants of one recipe through the same pipeline, one report with the Pareto frontier
and the cheapest variant that passes the gates. Light at import (no torch, no ray): recipe.py imports the spec.

    spec.py       the recipe's `sweep:` section (grid and/or named variants) and its expansion into variants
    runner.py     plan every variant, run the runnable ones (resuming finished ones), progress, the sweep report
    executors.py  where variants run: in this process / a process pool, or as Ray tasks
    merge.py      one report from the variants' reports: frontier, cheapest passing, time saved by reuse
"""
