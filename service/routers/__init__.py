"""One router per resource: search, images, index, health/metrics, page."""
