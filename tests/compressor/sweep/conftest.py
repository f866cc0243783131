"""Fixtures of the sweep tests: a sweep recipe on the tiny Llama, and a marker for tests that start Ray."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts a local Ray cluster in the test process (-m 'not ray' skips)")


VARIANTS = """  variants:
    - {name: int8, set: {passes.0.granularity: per_channel}}
    - {name: int4-g32, set: {passes.0.format: int4, passes.0.granularity: per_group, passes.0.group_size: 32}}
    - {name: int4-g16, set: {passes.0.format: int4, passes.0.granularity: per_group, passes.0.group_size: 16}}
    - {name: nvfp4, set: {passes.0.format: nvfp4}}
"""


@pytest.fixture()
def sweep_recipe(tmp_path, tiny_model_dir, text_dir):
    """A sweep recipe on the tiny model: RTN variants, a KL gate, eval on the local text, no export."""

    def make(sweep: str = VARIANTS, gates: str = "  - {metric: kl_divergence, max: 0.0001}\n",
             name: str = "sweep.yaml") -> Path:
        p = tmp_path / name
        p.write_text(f"""schema_version: 1
name: tiny-sweep
model:
  source: {tiny_model_dir}
passes:
  - pass: quantize_rtn
    format: int8
export: []
eval:
  datasets:
    - name: local
      source: {text_dir}
  num_windows: 4
  seq_len: 64
  latency: {{enabled: false}}
gates:
{gates}sweep:
{sweep}""")
        return p

    return make
