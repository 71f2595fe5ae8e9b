"""`ualm mixture sweep` presets: the demo sweep and its candidate blends."""
