"""Benchmarks: scripts that print a table and write JSON (and a plot). Run by hand, never by the tests."""
