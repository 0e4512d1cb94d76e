"""Small utilities shared by the package, its tools and its tests."""
