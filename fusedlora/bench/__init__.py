"""The benchmark harness behind ``fusedlora bench``: timing, ceilings, baselines, results, rendering."""
