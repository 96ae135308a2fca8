"""Helpers for driving a real ComfyUI: start and stop a server with the pack, talk to it over HTTP and the
websocket, and convert saved workflows into the API graphs it runs. Used by the tests and by scripts/demo.py;
nothing here needs pytest."""
