"""The HTTP front door: the page, the JSON API, offer/answer and ICE configuration."""
