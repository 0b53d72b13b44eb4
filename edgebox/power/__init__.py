"""Power: sensors (sensors.py) and, from the governor's owner, the budget governor."""
