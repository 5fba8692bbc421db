"""The HTML report: what sets segments apart, charts and the page."""
