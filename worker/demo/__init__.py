"""``paypoll demo``: the whole pipeline on one machine, started, shown and stopped by one command.

Modules, in the order the demo uses them: ``children`` (subprocesses in their own process
groups that die with the demo), ``redis_provider`` (which Redis to use, and cleaning up only the
demo's keys), ``stack`` (sandbox, accounts file and worker fleet), ``probes`` (the sandbox's
admin stats and the fleet's /metrics, read as the demo runs), ``view`` (live ANSI or plain
lines), ``orchestrator`` (the run: submit, watch, summarise, stop) and ``cli``.
"""
