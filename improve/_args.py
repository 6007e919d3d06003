"""Job arguments of the `improve` jobs: the same YAML + flags mechanism as `rahf train` (rahf/job_args.py)."""

from rahf.job_args import MIXED_PRECISIONS, parse_job_args, resolve_mixed_precision, uses_cpu_processes

__all__ = ["MIXED_PRECISIONS", "parse_job_args", "resolve_mixed_precision", "uses_cpu_processes"]
