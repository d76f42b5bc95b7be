"""The operator console: tenants, fleet migrations, traffic and `doctor`, in the browser.

Needs Jinja2: `pip install 'fastapi-tenancy[console]'`. Mount it beside the application
(the tenants' requests never reach it), guarded by your own auth dependency:

    app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/_tenancy"])
    app.mount("/_tenancy", manager.console(auth=require_operator))

A feature too large for one module:

- `app.py`: `Console`, the ASGI app: auth on every route, security headers, rendering;
- `pages.py`, `actions.py`: its pages (GET) and its changes (POST, through the manager);
- `csrf.py`: the forms' tokens; `search.py`: the tenant list's filters and bounded scan;
- `fleet.py`: fleet runs read back and upgrades run in the background;
- `traffic.py`: the metrics sampled over time, as plots; `templates/`, `static/`.
"""

from .app import Console, OperatorAuth

__all__ = ["Console", "OperatorAuth"]
