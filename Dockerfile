# crm-sync's image: the official Airflow image plus crm-sync's pinned requirements.txt and the
# crm-sync package. docker-compose.yaml runs every Airflow service, the seed job and the API
# simulators on it; a Celery worker on another machine needs only this image and the connections.
#
#   docker build -t crm-sync-airflow:local .      # or: docker compose build
#
# The Airflow in the image stays the base image's: requirements.txt pins apache-airflow too, and the
# install below names the image's own version (${AIRFLOW_VERSION}, set by the base image) next to it,
# so a base image of another Airflow fails the build with a conflict instead of being re-versioned.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

# Python packages go in as the airflow user, the image's documented way (as root its pip refuses).
USER airflow

# Dependencies first: this layer is rebuilt only when requirements.txt changes. pip and setuptools
# stay the image's own (requirements.txt pins the development venv's older ones).
COPY requirements.txt /requirements.txt
# The check after it: the image's Airflow is unchanged and its Celery provider still installed.
RUN grep -vE '^(pip|setuptools)==' /requirements.txt > /tmp/crm-sync-requirements.txt \
 && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/crm-sync-requirements.txt \
 && rm /tmp/crm-sync-requirements.txt \
 && python -c 'import importlib.metadata as md, os, sys; \
      v = md.version("apache-airflow-core"); md.version("apache-airflow-providers-celery"); \
      sys.exit(None if v == os.environ["AIRFLOW_VERSION"] else f"requirements.txt changed the image Airflow to {v}")'

# The crm-sync package (plugins/crm_sync, with the `crm-sync` command), built from a folder the
# airflow user owns: setuptools writes its build files next to the sources.
USER root
RUN install -d -o airflow -g 0 /opt/crm-sync /opt/crm-sync/plugins
USER airflow
COPY --chown=airflow:0 pyproject.toml /opt/crm-sync/pyproject.toml
COPY --chown=airflow:0 plugins/crm_sync /opt/crm-sync/plugins/crm_sync
RUN pip install --no-cache-dir --no-deps /opt/crm-sync

# The DAGs and what the package reads at run time (source YAMLs, SQL, expectation suites, match
# configs), where CRM_SYNC_HOME says. docker-compose.yaml mounts the checkout's dags/, plugins/ and
# include/ over them for development.
ENV CRM_SYNC_HOME=/opt/airflow
COPY --chown=airflow:0 include /opt/airflow/include
COPY --chown=airflow:0 dags /opt/airflow/dags

# Fail the build, not the first task: what the seed job and the simulators run first (the sample
# people's names need pypinyin and opencc) works, the modules the tasks and the simulators import
# import, and the `crm-sync` command runs.
RUN python -c 'from crm_sync.simulators import people; \
      people.generate_people(20, 42); people.to_traditional("\u7b80\u4f53")' \
 && python -c 'import crm_sync.identity.normalize, crm_sync.identity.scoring, crm_sync.quality.validate, \
      crm_sync.sources.sheets, crm_sync.staging, crm_sync.simulators.ticketing, crm_sync.simulators.im, \
      crm_sync.simulators.callcenter, crm_sync.simulators.spreadsheet' \
 && crm-sync --help > /dev/null
