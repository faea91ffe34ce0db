"""corrtools.analysis"""
