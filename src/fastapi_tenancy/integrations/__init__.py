"""Job-queue integrations: the tenant travels with each job and is re-checked in the worker.

One module per queue, each importing its queue library (an optional extra):
`fastapi_tenancy.integrations.arq` (`pip install 'fastapi-tenancy[arq]'`) and
`fastapi_tenancy.integrations.celery` (`pip install 'fastapi-tenancy[celery]'`).
"""
