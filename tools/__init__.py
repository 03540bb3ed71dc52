"""Maintainer tools that pip does not ship: the parity checks against the authors' FlowAR and VAR code, the
benchmarks' mode that times the authors' code beside ours, the demo table and the GPU check script.

They import the library (flowar, heads, vae, train, eval); the library never imports them. Run them from
the repository root, e.g. ``python -m tools.parity_flowar --reference /path/to/FlowAR --preset flowar-s``.
"""
