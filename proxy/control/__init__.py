"""The shared control plane: several dnschaos instances, one game day.

With `control: redis://HOST:PORT/DB` every mutation of faults is appended
to a Redis Stream, and every instance tails it and applies it (plane.py);
the operations and how they are applied are in ops.py; the counts of all
instances are merged in counts.py.  Without `control` nothing here is
imported, and redis-py is not needed."""
