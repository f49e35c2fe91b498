"""What a browser or another system reads: the dashboard, the JSON API and /metrics."""
