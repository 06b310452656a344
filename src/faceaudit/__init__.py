"""faceaudit: measure how re-identifiable faces are in data believed anonymous."""

__version__ = "0.1.0"
