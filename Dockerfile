# One image for every process of the stack; docker-compose.yml picks the
# command. torch is the CPU/CUDA build that pip resolves for the platform.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
RUN python manage.py collectstatic --noinput
EXPOSE 8000
CMD ["python", "-m", "uvicorn", "chatsite.asgi:application", "--host", "0.0.0.0", "--port", "8000"]
