"""Fault, driver-kill and bad-input scenarios shared by tests/ and bench/ (not packaged)."""
