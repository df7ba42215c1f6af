"""What is measured: the score columns (columns.py) and their intervals (stats.py)."""
