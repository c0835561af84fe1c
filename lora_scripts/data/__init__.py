"""Reading, checking and loading training data."""
