"""Scarce."""
