"""MoE passes: expert statistics (expert_stats.py), trimming (expert_trim.py) and merging (expert_merge.py)."""
