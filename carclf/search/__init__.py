"""Searches: Ray Tune + Optuna over Ray Train runs (``carclf tune``).

``space`` turns a config's studies into trial configs and Tune domains, ``tune`` runs the studies
and collects one row per trial, ``report`` turns those rows into the comparison, plots and the
Optuna study. Imports go ``tune → report → space``, never back.
"""
