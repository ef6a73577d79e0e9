"""spafit"""
