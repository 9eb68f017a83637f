"""The serving layer between HTTP and the engines: endpoints, their registry, the router
(see docs/serving-layer.md)."""
