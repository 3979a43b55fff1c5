"""Experiment scripts for jaxprune: configs, data, models and training recipes.

Everything here uses only jaxprune's public API, like any user would.
"""
