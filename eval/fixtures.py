"""Test and benchmark fixtures built here: `python -m compressor.eval.fixtures NAME ...`.

    python -m compressor.eval.fixtures moe-mixtral --out DIR   # the trained MoE fixtures (compressor.moe_fixtures)
    python -m compressor.eval.fixtures moe-qwen --out DIR
    python -m compressor.eval.fixtures synthetic-llama --shape llama-2-7b --out DIR   # random bf16, sharded
                                                               # (compressor.synthetic_llama; llama-1b, tiny)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "synthetic-llama":
        from compressor.synthetic_llama import main as synthetic

        return synthetic(argv[1:])
    from compressor.moe_fixtures import main as moe

    return moe(argv)


if __name__ == "__main__":
    sys.exit(main())
