"""Clusters, kernel and server side: start or connect (:mod:`.api`), discovery files the
sidebar reads (:mod:`.discovery`), live figures from the scheduler (:mod:`.info`), workers
brought back after a death (:mod:`.revive`) and the GPUs this machine has (:mod:`.hardware`).

Nothing here imports torch; everything that runs work (training, scoring) builds on it.
"""
