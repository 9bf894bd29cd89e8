"""Spiking backend: runs analog_ep's Φ with rate-coded spiking units."""
