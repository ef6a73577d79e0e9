"""hift"""
