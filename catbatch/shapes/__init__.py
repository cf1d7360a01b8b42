"""A small text-to-image domain of our own: procedural shape scenes, a checker, training."""
