"""Ray Serve applications of llava-platform (installed with the package, so `serve deploy` finds
them on every node)."""
