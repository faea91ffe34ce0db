"""corrtools.sparse"""
