"""Chaos tier: faults injected into a live fleet (issue 13); each test is bounded and cleans up."""
