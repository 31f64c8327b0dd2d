# The layerwatch server (API, ingest, dashboard). The server never imports torch, so
# the image carries none: it installs the [server] and [postgres] dependency groups
# read from pyproject.toml itself (one list, never copied here), then the package
# without its dependencies (which would bring torch for the training side).
# tests/test_packaging.py runs these install steps in a clean virtualenv and starts
# the server from it.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY layerwatch ./layerwatch
COPY client_hook ./client_hook
COPY server ./server
COPY web ./web
RUN python -c "import tomllib; groups = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(groups['server'] + groups['postgres']))" > /tmp/server-requirements.txt \
 && pip install --no-cache-dir -r /tmp/server-requirements.txt \
 && pip install --no-cache-dir --no-deps .

VOLUME ["/data"]
EXPOSE 8000
CMD ["layerwatch", "serve", "--host", "0.0.0.0", "--port", "8000", "--db", "sqlite:////data/layerwatch.db"]
