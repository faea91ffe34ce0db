"""corrtools.workloads"""
