"""Model monitoring: reference samples, drift statistics and quality from delayed labels.

Kernel-, scheduler- and worker-safe: numpy, pandas and scipy only, imported when used.
"""
