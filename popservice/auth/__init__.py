"""popservice.auth"""
