"""The browser page: plain HTML, CSS and JavaScript modules, served by `signaling.app`.

A package only so that its files install with the server (package data) and can be found
with `importlib.resources.files("client")`; there is no Python here and no build step.
"""
