"""The modelled hardware: chip profiles (TOML) and the one step-cost model."""
