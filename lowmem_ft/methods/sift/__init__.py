"""sift"""
