"""The report, read-only over run directories: runs, studies, tables, report.md and plots."""

from slt.reporting.runs import load_runs
from slt.reporting.write import write_report

__all__ = ["load_runs", "write_report"]
