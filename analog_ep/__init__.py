"""Analog (rate-based) Equilibrium Propagation: one scalar primitive Φ, Hopfield attention."""
