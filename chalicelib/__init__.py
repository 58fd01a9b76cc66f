"""MAOF: the Multi-Agent Orchestration Framework, as a Chalice application.

Dependencies point down (docs/architecture.md "Code layout"; `lint-imports` checks it):
the HTTP adapter (openapi.py above http.py), health.py and the migrate function
(maintenance.py); workflows/, the API's use cases on runs; engine/, which runs stages
(handlers.py: the SQS batch and the schedules); agents/; auth/; audit/; the Redis and AWS
clients (cache.py, limits.py, aws.py) and observability.py; db/; logs.py; core/, the
framework-free vocabulary; config.py.
"""

__version__ = "0.1.0"
