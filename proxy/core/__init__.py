"""The core: wire format, scenario model, selectors, faults and the engine.

No I/O here: nothing in this package opens a socket, reads the clock or
uses the global random generator; callers pass the time and a
`random.Random` in, and tests move the clock by hand.

Layout, lowest first (a module imports only from the ones above it):
  codes.py, wire.py, query.py, verdict.py, sampling.py, records.py,
  stale.py, schedule.py
                  DNS names and numbers; reading raw messages; one query
                  as a view; what the engine answers; stable shares; zone
                  lines; the store of past answers; cron arithmetic
  replies.py      every reply the proxy builds, as bytes
  spec.py         the pieces of the scenario format (durations, Base...)
  faults/         one module per fault: its model, behaviour, registration
  model.py        the scenario format (rules, phases, probes, scenario)
  selectors.py, rule_index.py
                  compiled matches; rules filed by name and zone
  plan.py, counts.py, engine.py
                  a run's compiled plan; its counts as rows; the engine

Clocks.  Two clocks cross this package, both in float seconds:
- *wall time* (`now`): Unix seconds as the caller read them.  Every Engine
  entry point takes it (`on_query(q, now, rng)`, `tick(now)`,
  `add_run(..., started_at, now)`), and so do the schedule functions.
  Client records (`first_seen`, `last_seen`) and a run's `hard_end` are
  wall time.
- *run time* (`run_time`): a run's own clock, wall time minus the seconds
  the run has spent paused (`Run.shift`).  A run's phases are laid out in
  it, and faults see only it: `Fault.apply(q, run_time, rng, phase)` and
  `Fault.respond(...)`, with `PhaseState.start_run_time` the phase's start
  on the same clock, so flap and partial periods stand still while a run
  is paused.  For a run never paused the two are equal.
"""
