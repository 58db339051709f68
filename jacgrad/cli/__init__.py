"""jacgrad.cli.main: The jacgrad command (report, check, info, bench). May import everything below.
"""
