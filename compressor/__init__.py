"""compressor: an offline optimizer for large language models.

The core modules here import no heavy dependency at module top, so `compress --help`, `compress targets`
and `compress plan` start fast and never load weights.
"""

__version__ = "0.1.0"
