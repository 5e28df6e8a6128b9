"""The one events path: ranks log Dask events (:mod:`.events`: topics, batching, points) and
subscribers fold them into runs and panel columns (:mod:`.fold`). Pure, torch-free.
"""
