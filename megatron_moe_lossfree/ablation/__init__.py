"""``mlf-ablate``: the LFB / DeepSeek ablations with one command (suites.py: the arms; runner.py: the
runs and the command line; report.py: the paper-shaped table)."""
