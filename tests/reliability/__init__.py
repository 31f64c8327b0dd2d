"""Fault-injection tests (issue #5): killed servers, dropped connections, load, fuzzed ingest, the OpenAPI contract."""
