"""popservice.server"""
