"""Worker processes: `--workers N` serves DNS from N processes on one port.

How it works:
- The main process is the control plane: admin API, game-day manager,
  scheduler, scenario watcher.  It serves no DNS.  It starts N workers
  (pool.py), each a Forwarder and a replica Engine bound to every listen
  address with SO_REUSEPORT (UDP and TCP; proxy/listeners.py), so the
  kernel spreads clients over them (child.py).  First the main process
  binds every address without SO_REUSEPORT, to refuse one another program
  holds (it would share that program's queries); then it binds them with
  SO_REUSEPORT (a port 0 resolved to a number) and holds them until every
  worker is listening on the same number.
- Each worker has a control channel (ipc.py): a unix socketpair carrying
  length-prefixed pickles, in order, read by the event loop on both ends;
  no wait blocks the main process's loop.
- The game day drives a `LoggedEngine` (replication.py): every engine
  mutation applies to the main process's own engine (run state, read by the
  API, stays local and exact) and is appended to a log of engine calls with
  sequence numbers, which every worker applies in order.  After an API call
  that changed state, the admin listener awaits every serving worker's
  acknowledgement (bounded), so when the call returns, every worker applies
  it to the very next query.  A worker that (re)starts gets a snapshot of
  the log and the entries after it.  The game day's `release` (the queries
  a stopped or paused run holds in a delay let go) is a message too.
- Traffic counts (`stats`, `client_stats`, /metrics, /health) are gathered
  from every worker, without blocking, before a request reads them, and
  merged (merge.py, view.py).  The counts a dead worker had at the last
  gather are kept, so totals do not go backwards when it is replaced.
- A worker that dies is restarted (a warning is logged).  A worker exits
  when the main process dies (PR_SET_PDEATHSIG, and end of file on its
  control channel).
- Shutdown: the main process asks every worker to drain (stop reading,
  answer what is in flight up to the query deadline, exit 0), waits for
  them, and kills what is left after a bound.
"""
