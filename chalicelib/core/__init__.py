"""The vocabulary every part of MAOF speaks, with no framework: errors, the caller, request
models and paging, run ids, JSON as MAOF stores and serves it, capability tags."""
