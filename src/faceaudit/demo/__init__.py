"""The embedded demo: a SIMULATED PET/CT cohort and the six stages run on it."""
