"""magnitude"""
