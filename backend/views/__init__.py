"""HTTP views, one blueprint per resource; each stays thin and calls the registry."""
