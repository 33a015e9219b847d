"""The core: wire format, selectors, faults and the engine. No I/O here:
nothing in this package opens a socket, reads the clock or uses the global
random generator; callers pass `now` and a `random.Random` in."""
