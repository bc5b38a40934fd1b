"""popservice.client"""
