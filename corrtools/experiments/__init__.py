"""Runners for the paper's experiments, writing tidy result tables under ``data/results/``.

``reset_z``: validation loss against RESET's interval z, fixed and automatic (Figure 2, right).
"""
