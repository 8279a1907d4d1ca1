"""Expert routing analysis."""
