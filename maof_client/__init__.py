"""MAOF's Python client and the `maof` command line (never deployed: `chalice package`
bundles only app.py and chalicelib/)."""

__version__ = "0.1.0"  # before the imports: the client reads it

from maof_client.client import (
    MaofClient,
    MemoryTokenStore,
    TokenStore,
    new_idempotency_key,
)
from maof_client.config import CredentialsFile
from maof_client.errors import (
    ConnectionFailed,
    MaofError,
    NotFound,
    NotSignedIn,
    RateLimited,
    RequestFailed,
    Unauthorized,
    UnexpectedResponse,
    ValidationError,
)
from maof_client.models import (
    Agent,
    AuditTrail,
    Run,
    RunResult,
    Stage,
    Submission,
    Tokens,
)

__all__ = [
    "Agent",
    "AuditTrail",
    "ConnectionFailed",
    "CredentialsFile",
    "MaofClient",
    "MaofError",
    "MemoryTokenStore",
    "NotFound",
    "NotSignedIn",
    "RateLimited",
    "RequestFailed",
    "Run",
    "RunResult",
    "Stage",
    "Submission",
    "TokenStore",
    "Tokens",
    "Unauthorized",
    "UnexpectedResponse",
    "ValidationError",
    "__version__",
    "new_idempotency_key",
]
