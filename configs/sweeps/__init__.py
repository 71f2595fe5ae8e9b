"""Data-blend presets (`base:` of the stage configs)."""
