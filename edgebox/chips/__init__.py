"""Simulated accelerator chips: partition plan, chips, their host threads, the box."""
