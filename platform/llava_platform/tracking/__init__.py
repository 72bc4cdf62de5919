"""The one place that touches MLflow: tracking URIs, runs and their metrics (``runs``), model URIs,
downloads and lineage (``models``). Training, evaluation and serving import it, never each other."""
