"""Clean vs Messy."""
