"""popservice.stores"""
