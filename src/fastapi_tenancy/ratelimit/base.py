"""`RateLimiter`: the per-tenant limit policy, and the contract of a limiter backend.

The algorithm is GCRA (the generic cell rate algorithm), in every backend. It keeps a
single number per tenant, the "theoretical arrival time" (TAT) of the next request:
each admitted request pushes it `window / limit` seconds further, and a request is
refused while the TAT is more than one window ahead of now. So a tenant can burst
`limit` requests at once, then is held to an even `limit` per window, with no
boundary effect (a fixed window admits 2x the limit across its edge), one key and
O(1) time per check (a sliding log stores every request), and an exact answer to
"when may I retry?" for `Retry-After`.
"""

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import RateLimitExceededError, TenancyUnavailableError
from ..tenant import Tenant

__all__ = ["RateLimitDecision", "RateLimitUsage", "RateLimiter", "RefusalHook", "gcra"]

logger = logging.getLogger("fastapi_tenancy")

_POLICY_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The outcome of one check: admitted or not, and what the response headers say."""

    allowed: bool
    limit: int
    remaining: int
    window: float
    reset_after: float
    """Seconds until the tenant's full quota is available again."""
    retry_after: float
    """Seconds until a request would be admitted (0 when this one was)."""

    def headers(self) -> dict[str, str]:
        """`RateLimit-*` headers (IETF httpapi draft), plus `Retry-After` when refused."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_after)),
            "RateLimit-Policy": f"{self.limit};w={_number(self.window)}",
        }
        if not self.allowed:
            # Rounded up, and at least 1: retrying at that moment must succeed.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


@dataclass(frozen=True, slots=True)
class RateLimitUsage:
    """A tenant's quota as it stands, read without counting a request (`RateLimiter.usage`)."""

    limit: int
    window: float
    used: int
    """Requests the quota holds now: `limit` means the next one is refused."""
    reset_after: float
    """Seconds until the full quota is available again (0: it is)."""


RefusalHook = Callable[[Tenant, RateLimitDecision], None]
"""Called with the tenant and the decision each time `RateLimiter.check` refuses a request."""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def gcra(tat: float, now: float, limit: int, window: float) -> tuple[float | None, RateLimitDecision]:
    """One GCRA step: (the new TAT, or None when refused; the decision). Times in seconds."""
    interval = window / limit
    tat = max(tat, now)
    new_tat = tat + interval
    if new_tat - now > window + 1e-9:
        return None, RateLimitDecision(False, limit, 0, window, tat - now, new_tat - window - now)
    remaining = math.floor((window - (new_tat - now)) / interval + 1e-9)
    return new_tat, RateLimitDecision(True, limit, remaining, window, new_tat - now, 0.0)


class RateLimiter(ABC):
    """Decides whether a tenant may make one more request. Safe to share between requests.

    `check(tenant)` applies the policy: `requests` per `window` seconds by default;
    `plans` maps a plan name (the tenant's `metadata["plan"]`) to its requests per
    window; a tenant's `metadata["rate_limit"] = {"requests": 10, "window": 1}`
    overrides both (either key may be left out). When the backend is unreachable,
    `fail_open` admits the request, otherwise `check` raises `TenancyUnavailableError`
    (503); either way the failure is counted in `failures` and logged once per outage.

    To add a backend, implement `hit` (atomically: concurrent calls must never admit
    more than the limit) and, if it can fail, `is_outage`; `peek` lets `usage` read a
    tenant's quota without counting (the operator console shows it).

    `on_refused` holds hooks called with each refused request's tenant and decision
    (`TenantMetrics.count_refusals` adds one); a hook that raises is logged, never raised.
    """

    def __init__(
        self,
        *,
        requests: int = 100,
        window: float = 60.0,
        plans: Mapping[str, int] | None = None,
        fail_open: bool = True,
    ) -> None:
        self.requests = requests
        self.window = window
        self.plans = dict(plans or {})
        self.fail_open = fail_open
        self.failures = 0
        """Checks the backend could not answer (outages)."""
        self.on_refused: list[RefusalHook] = []
        self._failing = False
        self._policies: dict[tuple[str, object], tuple[int, float]] = {}

    async def initialize(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Connect to the backend. Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the backend's connections. Idempotent."""

    @abstractmethod
    async def hit(self, key: str, limit: int, window: float) -> RateLimitDecision:
        """Count one request against `key` if `limit` per `window` seconds allows it."""

    def is_outage(self, exc: BaseException) -> bool:
        """True when `exc` from `hit` means the backend is unreachable."""
        return False

    async def peek(self, key: str) -> float | None:
        """Seconds the theoretical arrival time of `key` is ahead of now (0: a full quota),
        without counting a request; None when the backend cannot tell (the default)."""
        return None

    async def usage(self, tenant: Tenant) -> RateLimitUsage | None:
        """How much of its quota `tenant` holds now, without counting a request.

        None when the backend cannot read a quota without counting, or is unreachable.
        """
        limit, window = self.limits(tenant)
        try:
            ahead = await self.peek(self._key(tenant, limit, window))
        except Exception as exc:
            if not self.is_outage(exc):
                raise
            return None
        if ahead is None:
            return None
        ahead = min(max(ahead, 0.0), window)
        interval = window / limit
        used = limit - math.floor((window - ahead) / interval + 1e-9)
        return RateLimitUsage(limit, window, min(max(used, 0), limit), ahead)

    @staticmethod
    def _key(tenant: Tenant, limit: int, window: float) -> str:
        # The policy is part of the key: a TAT means nothing under another interval, so a
        # changed limit starts with a full quota (the old key simply expires).
        return f"{tenant.id}:{limit}:{_number(window)}"

    def limits(self, tenant: Tenant) -> tuple[int, float]:
        """(requests, window) for `tenant`: its metadata override, else its plan, else the default."""
        # Keyed by version: a changed tenant (new updated_at) gets its policy recomputed.
        key = (tenant.id, tenant.updated_at)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policy(tenant)
            if len(self._policies) >= _POLICY_CACHE_SIZE:
                self._policies.clear()
            self._policies[key] = policy
        return policy

    def _policy(self, tenant: Tenant) -> tuple[int, float]:
        requests, window = self.requests, self.window
        plan = tenant.metadata.get("plan")
        if isinstance(plan, str) and plan in self.plans:
            requests = self.plans[plan]
        override = tenant.metadata.get("rate_limit")
        if isinstance(override, Mapping):
            custom_requests = override.get("requests", requests)
            custom_window = override.get("window", window)
            if _positive(custom_requests, integer=True) and _positive(custom_window, integer=False):
                return int(custom_requests), float(custom_window)
            # A bad override must not lift the limit: keep the plan's or the default.
            logger.warning("tenant %s: ignoring invalid rate_limit metadata %r", tenant.identifier, override)
        return requests, window

    async def check(self, tenant: Tenant) -> RateLimitDecision | None:
        """Count one request of `tenant`; raise `RateLimitExceededError` (429) if over its limit.

        Returns the decision (for the `RateLimit-*` headers), or None when the backend
        is down and the limiter fails open.
        """
        limit, window = self.limits(tenant)
        try:
            decision = await self.hit(self._key(tenant, limit, window), limit, window)
        except Exception as exc:
            if not self.is_outage(exc):
                raise
            self.failures += 1
            if not self._failing:
                self._failing = True
                logger.warning(
                    "rate limiter unavailable (%s: %s); failing %s",
                    type(exc).__name__,
                    exc,
                    "open (requests admitted)" if self.fail_open else "closed (503)",
                )
            if self.fail_open:
                return None
            raise TenancyUnavailableError(
                f"rate limiter unavailable: {type(exc).__name__}", detail="Rate limiter unavailable"
            ) from exc
        if self._failing:
            self._failing = False
            logger.info("rate limiter reachable again")
        if not decision.allowed:
            self._refused(tenant, decision)
            raise RateLimitExceededError(tenant.identifier, decision.headers())
        return decision

    def _refused(self, tenant: Tenant, decision: RateLimitDecision) -> None:
        for hook in self.on_refused:
            try:
                hook(tenant, decision)
            except Exception:  # a counter must never turn a 429 into a 500
                logger.exception("rate limiter refusal hook %r failed", hook)


def _positive(value: object, *, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if integer and not float(value).is_integer():
        return False
    return value > 0 and math.isfinite(value)
