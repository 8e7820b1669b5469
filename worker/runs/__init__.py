"""What a worker does with a model's queue, one module per step, in the order a run takes them:

1. ``leases``: claim the model and its oldest queued requests (a batch), renew the lease from a
   heartbeat, and write the outcome only while the lease holds (``settling``);
2. ``prepare``: the current version as a package, each forget set checked and measured;
3. ``train``: the engine forgets the batch's classes; earlier classes are re-checked;
4. ``gate``: what a candidate must show before it may be published;
5. ``settle``: publish version n+1 and complete the requests, or fail, cancel, re-queue them;
6. ``pipeline`` ties them together (``process_model``, ``run_batch``); ``sweep`` runs on its own.

The database, not the broker, decides what runs. If a worker dies, its leases expire and the
sweep puts its requests back in the queue: a request can be delayed, never lost.
"""
