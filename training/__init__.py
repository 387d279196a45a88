"""cmserve training package."""
