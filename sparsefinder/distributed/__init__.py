"""Distributed engines on a Ray cluster: corpus extraction (:mod:`.ray_extract`), sweeps and curves (:mod:`.ray_sweep`).

Ray is an optional dependency (``pip install sparsefinder[ray]``). Nothing here imports it at
import time: the modules import ``ray`` inside the functions that need it, so the single-process
paths never load it. Connection and resource sizing are shared in :mod:`.cluster`.
"""
