"""Simulated accelerator chips running a model tensor-parallel.

partition (which heads / FFN rows / vocabulary rows each chip owns) > tp (how each weight is cut:
column-, row-, vocab-parallel) > chip (a chip and its layer shards) > blocks (what a chip
computes of a layer) > threads (the host threads the chips run on) > box (placement, running a
block on every chip, the all-reduce and gather, device time and firmware).
"""
