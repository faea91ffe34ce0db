"""corrtools.record"""
