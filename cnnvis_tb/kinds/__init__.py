"""The visual kinds. Each module holds one kind's pure functions and its ``log_*`` step for the logger."""
