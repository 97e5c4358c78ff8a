"""Talking to a running guest."""
