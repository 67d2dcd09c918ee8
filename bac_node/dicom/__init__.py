"""Reading and validating MG instances, UIDs, laterality and view, pairing."""
