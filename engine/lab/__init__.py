"""The lab's services behind the app: the session, profiling runs, the scheduler explorer, run comparison,
and who may load what."""
