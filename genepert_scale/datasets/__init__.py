"""Synthetic screens."""
