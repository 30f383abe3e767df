"""Model loading: the shipped defaults by name, users' own models by path or hub name."""
