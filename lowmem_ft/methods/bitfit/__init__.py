"""bitfit"""
