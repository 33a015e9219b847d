"""Game days: running scenarios on a schedule or on demand, stopping them,
probing stop conditions, watching the scenario directory, and reporting.

The pure parts live in proxy/core (engine runs, schedule arithmetic); this
package is the edge that reads the clock, runs asyncio tasks and writes files.
"""
