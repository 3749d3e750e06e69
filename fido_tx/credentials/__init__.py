"""What accounts prove themselves with: passwords and OAuth2 token providers
(:mod:`fido_tx.credentials.oauth`), and the SASL encodings that carry them
(:mod:`fido_tx.credentials.sasl`)."""
