"""Layer 6, releases: recipes, jobs, executors (local, Ray), the manifest, the Hub and the demo; they call
the converters as functions."""
