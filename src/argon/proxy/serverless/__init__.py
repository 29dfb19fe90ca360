"""Neon's serverless driver (`@neondatabase/serverless`) on the platform's HTTP port, as Neon's proxy
has `serverless/`: `routes` (the FastAPI routes the platform mounts: `POST /sql`, WebSockets on
/v2, /v1, /sql), `http_sql` (SQL over HTTP: password check, backend pool on the proxy's internal
socket, execution), `sql_over_http` (its request and response shapes, Neon's texts) and
`websocket` (a WebSocket bridged to an ordinary proxy session). ADR 0011.
"""
