# One image for every stillhouse role (migrate, worker, teacher, CLI).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The moderation teacher (hatesonar) needs the en_US.UTF-8 locale.
RUN apt-get update && apt-get install -y --no-install-recommends locales \
    && sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' /etc/locale.gen && locale-gen \
    && rm -rf /var/lib/apt/lists/*
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md alembic.ini ./
COPY schemas schemas
COPY storage storage
COPY workers workers
COPY student_train student_train
COPY migrations migrations
COPY stillhouse stillhouse
COPY examples examples
RUN pip install ".[all]"
RUN useradd --create-home stillhouse
USER stillhouse
ENTRYPOINT ["stillhouse"]
CMD ["--help"]
