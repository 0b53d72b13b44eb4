"""Power: sensors (hwmon, RAPL, psutil), budget windows, the governor, simulate and status."""
