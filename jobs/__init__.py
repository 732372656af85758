"""Entrypoints of docqa: the `docqa` command line (cli.py), a run's driver (run.py: the plan of plan.py on
the cluster of cluster.py, what to take of incremental.py, counted by stats.py), queries over the output
(query.py), the online endpoint (serve.py), Ray Jobs (submit.py); development tools in devtools/."""
