"""The workflow engine: run one stage per SQS message, advance the DAG, sweep stalled stages."""
