"""The worker side of a run: what executes on each Dask worker, one rank per worker.

- :mod:`.worker`: the rank's task, start to teardown (process group, environment, stdout);
- :mod:`.context`: ``ctx``, what the user's code sees;
- :mod:`.cancel`: cooperative cancels, checked at the rank's safe points;
- :mod:`.sharding`: each rank's slice of the data;
- :mod:`.ring`: the commit ring in the worker's memory, buddy copies, checkpoint writes;
- :mod:`.state`: copies of models, optimizers and RNG states;
- :mod:`.elastic`: how batch size and learning rate follow a changed world size;
- :mod:`.network`: the interface collectives bind to.

The kernel imports :mod:`.worker` and :mod:`.ring` only to name the functions it runs on the
workers; they load torch only when they run.
"""
