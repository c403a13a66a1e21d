"""The knobs autotune searches: knob types, spaces, candidates and presets (see DESIGN.md)."""
