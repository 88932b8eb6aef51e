"""dataprocess"""
