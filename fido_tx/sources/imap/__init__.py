"""sources/imap"""
