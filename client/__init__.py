"""What connects to the server from outside: the browser page (plain HTML, CSS and JavaScript
modules, served by `signaling.app`, no build step) and the Python client (`client.peer`).
"""
