"""popservice.sasl"""
