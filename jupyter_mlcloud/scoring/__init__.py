"""Batch scoring: the API (:mod:`.api`), the files it reads and writes (:mod:`.storage`:
zarr, parquet, netCDF, resumable), and the model shipped once to each worker (:mod:`.model`).
"""
