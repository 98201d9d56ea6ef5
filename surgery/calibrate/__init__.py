"""Calibration text and the layer-by-layer runner that feeds recipes what they ask for."""
