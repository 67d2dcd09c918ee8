"""Image handling of MG instances: the display transform, spacing, orientation, breast mask."""
