"""full"""
