"""Segments for new data: the live stream and exports."""
