# The layerwatch server (API, ingest, dashboard). The server never imports
# torch, so the image installs the package without its dependencies and then
# only the [server] ones (and the PostgreSQL driver of [postgres]): no multi-GB
# torch in a server image.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY client_hook ./client_hook
COPY server ./server
COPY web ./web
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "fastapi>=0.110" "uvicorn>=0.29" "websockets>=15" "sqlalchemy>=2.0" "plotly>=5.20" "psycopg[binary]>=3.1"

VOLUME ["/data"]
EXPOSE 8000
CMD ["layerwatch", "serve", "--host", "0.0.0.0", "--port", "8000", "--db", "sqlite:////data/layerwatch.db"]
