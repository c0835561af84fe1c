"""Memory estimate internals: the allocation counter, the fast probe, placement, the result cache."""
