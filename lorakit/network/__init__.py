"""Which layers of a model get adapters: targets, presets, names, SD blocks, applying and saving."""
