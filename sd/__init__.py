"""sd package."""
