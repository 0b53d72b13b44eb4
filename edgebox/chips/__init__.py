"""Simulated accelerator chips: profiles (profile.py), the cost model (cost.py)."""
