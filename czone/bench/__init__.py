"""Benchmarks: each scenario measures side by side in one run and reports medians."""
