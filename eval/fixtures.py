"""Test and benchmark fixtures built here: `python -m compressor.eval.fixtures NAME --out DIR`.

    python -m compressor.eval.fixtures moe-mixtral --out DIR   # the trained MoE fixtures (compressor.moe_fixtures)
    python -m compressor.eval.fixtures moe-qwen --out DIR
"""

from __future__ import annotations

import sys

from compressor.moe_fixtures import main

if __name__ == "__main__":
    sys.exit(main())
