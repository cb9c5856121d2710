# The image compose.yaml runs as api, relay and projector.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY projections projections
COPY api api
COPY consumers consumers
COPY infra infra
RUN pip install --no-cache-dir .
ENV LEDGERCORE_HOST=0.0.0.0
EXPOSE 8000
ENTRYPOINT ["ledgercore"]
CMD ["run"]
