"""Routing: signals, routers, the verifier, calibration, evaluation and Squeeze Evolve."""
