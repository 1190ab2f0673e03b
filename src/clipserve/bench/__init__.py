"""`clipserve bench`: side-by-side throughput and latency of clipserve and its reference points.

The bench starts what it measures (clipserve in-process on port 0, so that it can read the
batchers' statistics; server subprocesses where memory or a different runtime is measured),
drives closed-loop load from a separate load-generator process, and reports requests/s, items/s,
latency percentiles, the mean batch the server formed and the queue time, plus the issue's
targets as measured / target. See docs/performance.md.
"""
