"""cmserve service package."""
